"""nn.Linear: y = x W^T + b over any leading dims, so dW_i = sum_t g_t x_t^T and db_i = sum_t g_t."""

from torch import nn

from dpllm.privacy.contributions import Dense, Outer
from dpllm.privacy.rules import flatten_positions, register


@register(nn.Linear)
def linear_rule(module: nn.Linear, x, grad_out):
    g = flatten_positions(grad_out)
    contributions = []
    if module.weight.requires_grad:
        contributions.append((module.weight, Outer(g, flatten_positions(x))))
    if module.bias is not None and module.bias.requires_grad:
        contributions.append((module.bias, Dense(g.sum(1))))
    return contributions
