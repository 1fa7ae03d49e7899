"""One optimizer step over a logical batch, as the named stages of DP-SGD.

    clip_and_accumulate   per micro-batch: per-sample norms (ghost norms, one backward),
                          clip, sum into p.grad
    add_noise             N(0, (sigma C)^2) per coordinate, once per logical batch
    average               divide by the expected batch size q N (not the realised size,
                          which would leak it)
    optimizer_step        the wrapped optimizer's step, then zero the gradients
    accountant_step       one Poisson-subsampled Gaussian step for the accountant
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpllm.privacy.accountant import PrivacyAccountant
from dpllm.privacy.clipper import PerSampleClipper
from dpllm.privacy.noise import GaussianNoise


class PrivateStep:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float,
        noise: GaussianNoise,
        noise_multiplier: float,
        sample_rate: float,
        expected_batch_size: float,
        accountant: PrivacyAccountant,
        strategy: str = "auto",
    ) -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0 for a private step, got {noise_multiplier}")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm, strategy=strategy)
        self.optimizer = optimizer
        self.noise = noise
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.accountant = accountant
        self.step_index = 0
        self._reset_stats()

    @property
    def parameters(self) -> list[nn.Parameter]:
        return self.clipper.parameters

    def _reset_stats(self) -> None:
        self._samples = self._clipped = self._dropped = 0
        self._norm_sum = 0.0

    def clip_and_accumulate(self, per_sample_loss: Tensor) -> Tensor:
        norms = self.clipper.backward(per_sample_loss)
        finite = norms[torch.isfinite(norms)]
        self._samples += finite.numel()
        self._clipped += int((finite > self.clipper.max_grad_norm).sum())
        self._norm_sum += float(finite.sum())
        self._dropped += self.clipper.last_dropped
        return norms

    def add_noise(self) -> None:
        for p in self.parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(self.noise.sample(self.step_index, self.clipper.names[p], p).to(p.dtype))

    def average(self) -> None:
        for p in self.parameters:
            p.grad.div_(self.expected_batch_size)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def accountant_step(self) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)

    def step(self) -> dict:
        """Run the stages after the last micro-batch; returns this step's clipping statistics."""
        self.add_noise()
        self.average()
        self.optimizer_step()
        self.accountant_step()
        stats = {
            "samples": self._samples,
            "dropped_samples": self._dropped,
            "clipped_fraction": self._clipped / max(self._samples, 1),
            "mean_grad_norm": self._norm_sum / max(self._samples, 1),
        }
        self.step_index += 1
        self._reset_stats()
        return stats


class NonPrivateStep:
    """The same interface without clipping, noise or accounting: the baseline to compare with."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, expected_batch_size: float) -> None:
        self.optimizer = optimizer
        self.expected_batch_size = expected_batch_size
        self.step_index = 0
        self._samples = 0

    def clip_and_accumulate(self, per_sample_loss: Tensor) -> Tensor:
        (per_sample_loss.sum() / self.expected_batch_size).backward()
        self._samples += per_sample_loss.numel()
        return per_sample_loss.detach()

    def step(self) -> dict:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        stats, self._samples = {"samples": self._samples}, 0
        return stats
