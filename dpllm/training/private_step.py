"""One optimizer step over a logical batch, as the named stages of DP-SGD.

    clip_and_accumulate   per micro-batch: per-sample norms (ghost norms, one backward),
                          clip, sum into p.grad
    add_noise             N(0, (sigma C)^2) per coordinate, once per logical batch
    denoise               (optional) RMT denoising of the noisy projection matrices, s = sigma C;
                          post-processing of the private sum, so privacy is unchanged
    average               divide by the expected batch size q N (not the realised size,
                          which would leak it)
    optimizer_step        the wrapped optimizer's step, then zero the gradients
    accountant_step       one Poisson-subsampled Gaussian step for the accountant
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dpllm.denoise.gradient import GradientDenoiser, cosine
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
        denoiser_options: dict | None = None,
        denoise_every: int = 1,
        denoise_start: int = 0,
        diagnostics: bool = False,
        clipper_options: dict | None = None,
    ) -> None:
        """``denoiser_options`` (GradientDenoiser keywords) turns denoising on, every ``denoise_every``
        steps from step ``denoise_start`` (0-based) on. ``diagnostics`` logs cosines to the clipped
        (pre-noise) gradient: NOT private. ``clipper_options``: further PerSampleClipper keywords."""
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0 for a private step, got {noise_multiplier}")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        if not math.isclose(noise.std, noise_multiplier * max_grad_norm, rel_tol=1e-12):
            raise ValueError(
                f"the noise's std {noise.std} is not noise_multiplier * max_grad_norm = "
                f"{noise_multiplier * max_grad_norm}: the accountant would report a privacy the run does not have"
            )
        self.clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm, strategy=strategy, **(clipper_options or {}))
        self.optimizer = optimizer
        self.noise = noise
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.accountant = accountant
        self.step_index = 0
        named = {self.clipper.names[p]: p for p in self.clipper.parameters}
        self.denoiser = GradientDenoiser(named, **denoiser_options) if denoiser_options is not None else None
        if denoise_every < 1:
            raise ValueError(f"denoise_every must be >= 1, got {denoise_every}")
        if denoise_start < 0:
            raise ValueError(f"denoise_start must be >= 0, got {denoise_start}")
        self.denoise_every, self.denoise_start = denoise_every, denoise_start
        self.diagnostics = diagnostics
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
        self.noise.add_(self.step_index, {self.clipper.names[p]: p.grad for p in self.parameters})

    def denoise(self) -> dict:
        if self.denoiser is None or not self._denoise_due():
            return {}
        return self.denoiser(self.noise.std).as_log()

    def _denoise_due(self) -> bool:
        since = self.step_index - self.denoise_start
        return since >= 0 and since % self.denoise_every == 0

    def average(self) -> None:
        for p in self.parameters:
            p.grad.div_(self.expected_batch_size)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _snapshot(self) -> dict[str, Tensor]:
        return {
            self.clipper.names[p]: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for p in self.parameters
        }

    def _cosine_gains(self, clipped: dict[str, Tensor], noisy: dict[str, Tensor]) -> dict:
        """cos(denoised, clipped) - cos(noisy, clipped), per denoised layer and for the whole gradient."""
        now = {self.clipper.names[p]: p.grad for p in self.parameters}
        layers = {
            name: cosine([now[name]], [clipped[name]]) - cosine([noisy[name]], [clipped[name]])
            for name in self.denoiser.names
        }
        names = list(now)
        whole = cosine([now[n] for n in names], [clipped[n] for n in names]) - cosine(
            [noisy[n] for n in names], [clipped[n] for n in names]
        )
        return {"cos_gain": whole, "cos_gain_layers": layers}

    def accountant_step(self) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)

    def step(self) -> dict:
        """Run the stages after the last micro-batch; returns this step's clipping statistics."""
        clipped = self._snapshot() if self.diagnostics else None
        self.add_noise()
        noisy = self._snapshot() if self.diagnostics and self.denoiser is not None else None
        denoise_stats = self.denoise()
        diagnostics = self._cosine_gains(clipped, noisy) if noisy is not None and denoise_stats else {}
        self.average()
        self.optimizer_step()
        self.accountant_step()
        stats = {
            "samples": self._samples,
            "dropped_samples": self._dropped,
            "clipped_fraction": self._clipped / max(self._samples, 1),
            "mean_grad_norm": self._norm_sum / max(self._samples, 1),
            **denoise_stats,
            **diagnostics,
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
