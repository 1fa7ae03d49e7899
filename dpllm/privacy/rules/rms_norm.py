"""RMSNorm, y = w * x / rms(x), so dw_i = sum_t g_t * x_hat_t.

Every model family ships its own RMSNorm class (LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm,
MistralRMSNorm, ...). They are recognised by behaviour: a class named *RMSNorm whose only
parameter is a 1-D ``weight`` and whose output on a probe input equals ``w * x / rms(x)``.
A variant that computes something else (say Gemma's ``(1 + w)``) fails the probe and is
reported as unsupported instead of being clipped with the wrong formula.
"""

import copy

import torch
from torch import nn

from dpllm.privacy.contributions import Dense
from dpllm.privacy.rules import flatten_positions, register_matcher


def _eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return torch.finfo(module.weight.dtype).eps


def normalize(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) computed in fp32 and cast back, as the Hugging Face implementations do."""
    x32 = x.float()
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + _eps(module))
    return x_hat.to(x.dtype)


def _behaves_like_rms_norm(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    if not type(module).__name__.lower().endswith("rmsnorm") or set(params) != {"weight"}:
        return False
    weight = params["weight"]
    if weight.dim() != 1:
        return False
    if weight.is_meta:  # a sharding engine's rank before it materialises its shard: probe a copy
        module = copy.deepcopy(module).to_empty(device="cpu")
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        weight = module.weight
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        expected = weight * normalize(module, probe)
        got = module(probe)
    tol = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=tol, atol=tol)


@register_matcher(_behaves_like_rms_norm)
def rms_norm_rule(module: nn.Module, x, grad_out):
    if not module.weight.requires_grad:
        return []
    g = flatten_positions(grad_out)
    x_hat = flatten_positions(normalize(module, x)).to(g.dtype)
    return [(module.weight, Dense((g * x_hat).sum(1)))]
