"""nn.LayerNorm: y = w * x_hat + b, so dw_i = sum_t g_t * x_hat_t and db_i = sum_t g_t."""

import torch.nn.functional as F
from torch import nn

from dpllm.privacy.contributions import Dense
from dpllm.privacy.rules import flatten_positions, register


@register(nn.LayerNorm)
def layer_norm_rule(module: nn.LayerNorm, x, grad_out):
    k = len(module.normalized_shape)
    g = flatten_positions(grad_out, trailing=k)
    contributions = []
    if module.weight is not None and module.weight.requires_grad:
        x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        contributions.append((module.weight, Dense((g * flatten_positions(x_hat, trailing=k)).sum(1))))
    if module.bias is not None and module.bias.requires_grad:
        contributions.append((module.bias, Dense(g.sum(1))))
    return contributions
