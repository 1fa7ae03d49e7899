"""One optimizer step over a logical batch, as the named stages of DP-SGD.

    clip_and_accumulate   per micro-batch: per-sample norms (ghost norms, one backward),
                          clip, add to the step's clipped sums
    add_noise             N(0, (sigma C)^2) per coordinate, once per logical batch
    denoise               (optional) RMT denoising of the noisy projection matrices, s = sigma C;
                          post-processing of the private sum, so privacy is unchanged
    average               divide by the expected batch size q N (not the realised size,
                          which would leak it)
    optimizer_step        p.grad = the result cast to the parameter dtype, the wrapped
                          optimizer's step, then zero the gradients
    accountant_step       one Poisson-subsampled Gaussian step for the accountant

The clipped sums, the noise and the denoising stay in fp32 (fp64 for fp64 models) whatever the
parameter dtype, and are cast once, after the noise: adding clipped gradients in bf16 would make
the rounding of the sum depend on the other samples, and one sample could move it by more than C.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from dpllm.denoise.gradient import GradBuffer, GradientDenoiser, cosine
from dpllm.privacy.accountant import PrivacyAccountant
from dpllm.privacy.clipper import PerSampleClipper
from dpllm.privacy.noise import GaussianNoise, KeyedNoise
from dpllm.steps.batches import MicroBatch


class _BackwardStep:
    """What the gradient steps share: one Poisson sample per step, one backward per micro-batch."""

    samples_per_step = 1

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the step itself, beyond the optimizer, noise and accountant: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state(self) -> dict:
        """Tensors a checkpoint keeps per rank for the step itself: none."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        pass

    def run(self, draws: list[list[MicroBatch]], forward: Callable[[dict], Tensor]) -> list[Tensor]:
        """Forward and clipped backward of each micro-batch of the step's sample; returns the losses."""
        (micros,) = draws
        losses = []
        for mb in micros:
            loss = forward(mb.batch)
            if mb.padding:
                self.accumulate_nothing(loss)
                continue
            self.clip_and_accumulate(loss)
            losses.append(loss.detach())
        return losses


class PrivateStep(_BackwardStep):
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float,
        noise: KeyedNoise,
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
        if not math.isclose(noise.scale, noise_multiplier * max_grad_norm, rel_tol=1e-12):
            raise ValueError(
                f"the noise's scale {noise.scale} is not noise_multiplier * max_grad_norm = "
                f"{noise_multiplier * max_grad_norm}: the accountant would report a privacy the run does not have"
            )
        norm = (clipper_options or {}).get("norm", "l2")
        if norm not in noise.clip_norms:
            raise ValueError(
                f"{type(noise).__name__} is accounted at the sensitivity of a {' or '.join(noise.clip_norms)} clip, "
                f"and the clipper bounds the {norm} norm"
            )
        if denoiser_options is not None and not isinstance(noise, GaussianNoise):
            raise ValueError(f"denoising assumes Gaussian noise (its threshold is the Gaussian bulk edge), not {type(noise).__name__}")
        self.sums: dict[str, Tensor] = {}  # name -> this logical batch's clipped sum, fp32 at least
        self.clipper = PerSampleClipper(
            model, max_grad_norm=max_grad_norm, strategy=strategy, grad_sink=self.accumulate, **(clipper_options or {})
        )
        self.params = dict(self.clipper.by_name)
        self.optimizer = optimizer
        self.noise = noise
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.accountant = accountant
        self.step_index = 0
        self._buffers = {n: GradBuffer(shape) for n, shape in self.clipper.shapes.items()}
        self.denoiser = GradientDenoiser(self._buffers, **denoiser_options) if denoiser_options is not None else None
        if denoise_every < 1:
            raise ValueError(f"denoise_every must be >= 1, got {denoise_every}")
        if denoise_start < 0:
            raise ValueError(f"denoise_start must be >= 0, got {denoise_start}")
        self.denoise_every, self.denoise_start = denoise_every, denoise_start
        self.diagnostics = diagnostics
        self._reset_stats()

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

    def accumulate(self, name: str, clipped: Tensor | None) -> None:
        """Add one parameter's clipped micro-batch sum to the step's sum (the clipper's sink)."""
        if clipped is not None:
            self.sums[name] = clipped if name not in self.sums else self.sums[name].add_(clipped)

    def accumulate_nothing(self, per_sample_loss: Tensor) -> None:
        """A backward that adds exactly zero: the loss is weighted by 0 (non-finite ones by 0 too),
        for ranks that run extra micro-batches only to keep collectives in lockstep (sharded sums
        are reduced per micro-batch; FSDP2 gathers parameters in every forward and backward).
        The statistics do not count it."""
        finite = per_sample_loss.where(torch.isfinite(per_sample_loss.detach()), 0.0)
        self.clipper.backward(finite * 0.0)

    def _zeros(self, name: str) -> Tensor:
        """A zero sum for ``name``, in the sums' precision (fp32 at least) on the parameters' device."""
        some = next(iter(self.params.values()))
        return torch.zeros(self.clipper.shapes[name], dtype=torch.promote_types(some.dtype, torch.float32), device=some.device)

    def _complete_sums(self) -> dict[str, Tensor]:
        """The clipped sums of every parameter, zeros for those no sample reached."""
        for name in self.clipper.shapes:
            if name not in self.sums:
                self.sums[name] = self._zeros(name)
        return self.sums

    def add_noise(self) -> None:
        self.noise.add_(self.step_index, self._complete_sums())

    def denoise(self) -> dict:
        if self.denoiser is None or not self._denoise_due():
            return {}
        for name in self.denoiser.names:
            self._buffers[name].grad = self.sums[name]
        return self.denoiser(self.noise.std).as_log()

    def _denoise_due(self) -> bool:
        since = self.step_index - self.denoise_start
        return since >= 0 and since % self.denoise_every == 0

    def average(self) -> None:
        for g in self.sums.values():
            g.div_(self.expected_batch_size)

    def optimizer_step(self) -> None:
        for name, g in self.sums.items():
            p = self.params[name]
            p.grad = g.to(p.dtype)  # the one cast to the parameter dtype, after the noise
        self.sums.clear()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _snapshot(self) -> dict[str, Tensor]:
        return {name: g.clone() for name, g in self._complete_sums().items()}

    def _cosine_gains(self, clipped: dict[str, Tensor], noisy: dict[str, Tensor]) -> dict:
        """cos(denoised, clipped) - cos(noisy, clipped), per denoised layer and for the whole gradient."""
        now = self.sums
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


class NonPrivateStep(_BackwardStep):
    """The same interface without clipping, noise or accounting: the baseline to compare with
    (one process: it never pads)."""

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
