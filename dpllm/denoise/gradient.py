"""Denoising the noisy gradient of a model's projection matrices, between noise and optimizer.

Selects the 2-D weights to denoise by name (by default the attention and MLP projections of
Llama/Qwen-style decoders and BERT/RoBERTa encoders; embeddings, lm_head, biases and norms are left alone), groups them by
shape and denoises each group with one batched SVD.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpllm.denoise.rmt import DEFAULT_KAPPA, rmt_denoise_batched

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# BERT/RoBERTa encoder layers: attention query/key/value/output and the two MLP matrices.
ENCODER_PROJECTIONS = ("*.query.weight", "*.key.weight", "*.value.weight", "*.attention.output.dense.weight",
                       "*.intermediate.dense.weight", "*.layer.*.output.dense.weight")
DEFAULT_INCLUDE = tuple(f"*{name}.weight" for name in PROJECTIONS) + ENCODER_PROJECTIONS
LORA_INCLUDE = ("*lora_A*.weight", "*lora_B*.weight")


class GradBuffer:
    """A gradient tensor shown to the denoiser as a parameter with a ``.grad`` (the private step
    keeps its sums apart from the parameters, in fp32 and, when sharded, in full shape)."""

    def __init__(self, shape: torch.Size) -> None:
        self.shape, self.grad = shape, None

    def dim(self) -> int:
        return len(self.shape)


@dataclass
class DenoiseStats:
    matrices: int
    denoised: int
    mean_kept_rank: float  # over the matrices that were denoised

    def as_log(self) -> dict:
        return {
            "denoised_fraction": self.denoised / max(self.matrices, 1),
            "mean_kept_rank": self.mean_kept_rank,
        }


def select(named_params: dict[str, nn.Parameter], include, exclude=()) -> list[str]:
    """Names of the 2-D parameters matching an include pattern and no exclude pattern."""
    chosen = []
    for name, p in named_params.items():
        if p.dim() != 2:
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in include) and not any(
            fnmatch.fnmatchcase(name, pat) for pat in exclude
        ):
            chosen.append(name)
    return chosen


class GradientDenoiser:
    def __init__(
        self,
        named_params: dict[str, nn.Parameter],
        include=DEFAULT_INCLUDE,
        exclude=(),
        kappa: float = DEFAULT_KAPPA,
        norm_correction: str = "noisy",
        method: str = "auto",
    ) -> None:
        self.names = select(named_params, include, exclude)
        if not self.names:
            raise ValueError(f"no 2-D parameter matches the denoising patterns {list(include)} (exclude {list(exclude)})")
        self.params = {n: named_params[n] for n in self.names}
        self.kappa = kappa
        self.norm_correction = norm_correction
        self.method = method

    def __call__(self, noise_std: float) -> DenoiseStats:
        """Denoise ``p.grad`` in place for every selected parameter; ``noise_std`` is the per-entry std."""
        groups: dict[tuple, list[str]] = {}
        for name, p in self.params.items():
            groups.setdefault((tuple(p.shape), p.grad.dtype, p.grad.device), []).append(name)
        denoised, ranks = 0, []
        for names in groups.values():
            stack = torch.stack([self.params[n].grad for n in names])
            out, kept = rmt_denoise_batched(stack, noise_std, self.kappa, self.norm_correction, self.method)
            for name, g in zip(names, out):
                self.params[name].grad.copy_(g)
            denoised += int((kept > 0).sum())
            ranks.extend(int(k) for k in kept if k > 0)
        return DenoiseStats(len(self.names), denoised, sum(ranks) / len(ranks) if ranks else 0.0)


def cosine(a: list[Tensor], b: list[Tensor]) -> float:
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = sum(float(x.double().pow(2).sum()) for x in a) ** 0.5
    nb = sum(float(y.double().pow(2).sum()) for y in b) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0
