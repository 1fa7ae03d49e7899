"""nn.Embedding: row ids[t] of dW_i receives g_t; positions holding ``padding_idx`` receive nothing."""

from torch import nn

from dpllm.privacy.contributions import Outer
from dpllm.privacy.rules import UnsupportedModuleError, flatten_positions, register


def _validate(module: nn.Embedding) -> None:
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise UnsupportedModuleError(
            f"{type(module).__name__} with max_norm, scale_grad_by_freq or sparse=True has no per-sample rule"
        )


@register(nn.Embedding, validate=_validate)
def embedding_rule(module: nn.Embedding, ids, grad_out):
    if not module.weight.requires_grad:
        return []
    ids = ids.reshape(ids.shape[0], -1)
    g = flatten_positions(grad_out)
    if module.padding_idx is not None:
        g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
    return [(module.weight, Outer(ids, g, onehot_dim=module.num_embeddings))]
