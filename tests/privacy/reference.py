"""Independent per-sample gradients from torch.func (Jacobian of the per-sample loss vector)."""

import torch
from torch.func import functional_call, jacrev

from dpllm.lm import per_sample_loss


def per_sample_grads(model, batch):
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def losses(ps):
        out = functional_call(
            model,
            (ps, buffers),
            kwargs=dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False),
            tie_weights=True,
        )
        return per_sample_loss(out.logits, batch["labels"])

    jac = jacrev(losses)(params)  # name -> (B, *shape)
    return jac


def clipped_reference(model, batch, max_grad_norm):
    """(norms, {name: clipped sum}) with tied parameters counted once, as the sum of their uses."""
    jac = per_sample_grads(model, batch)
    by_param = {}
    for name, p in model.named_parameters():  # named_parameters lists a tied parameter once
        if p.requires_grad:
            by_param[name] = jac[name]
    bsz = batch["input_ids"].shape[0]
    sq = sum(g.reshape(bsz, -1).pow(2).sum(1) for g in by_param.values())
    norms = sq.sqrt()
    factors = (max_grad_norm / norms).clamp(max=1.0)
    clipped = {n: torch.tensordot(factors, g, dims=1) for n, g in by_param.items()}
    return norms, clipped
