"""The private step over several processes.

    clip_and_accumulate   each rank clips its own share of the Poisson sample into p.grad
    reduce_to_owners      each parameter's clipped sum is summed over ranks onto its owner
                          (one reduce per parameter: about half an all-reduce in volume)
    add_noise             the owner adds N(0, (sigma C)^2) from the parameter's own stream, keyed
                          by (seed drawn on rank 0, step, name): once, whatever the world size
    denoise               each owner denoises the projection matrices it owns (the SVD work is
                          balanced over ranks, see ownership.py); statistics summed over ranks
    average               divide by the expected batch size q N; non-owners hold zeros
    hand_over             the result reaches the ranks that update the parameter: a broadcast
                          from the owner (replicated parameters), or ZeRO-2's own reduce-scatter
                          into optimizer partitions (owner's value times the world size, zeros
                          elsewhere: ZeRO averages)
    optimizer_step, accountant_step   as in one process

Norm correction is per matrix ("noisy" or "estimate" rescale each matrix by its own norms), so it
needs no exchange beyond the owner. Communication per step: a reduce plus a broadcast or
reduce-scatter of the gradient, i.e. one all-reduce, and 7 scalars for the logs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dpllm.denoise.gradient import DEFAULT_INCLUDE, GradientDenoiser, select
from dpllm.distributed.env import DistEnv
from dpllm.distributed.ownership import assign_owners
from dpllm.training.private_step import PrivateStep

HANDOVERS = ("replicated", "deepspeed")


class ShardedPrivateStep(PrivateStep):
    def __init__(
        self,
        model: nn.Module,
        optimizer,
        *,
        env: DistEnv,
        handover: str = "replicated",
        denoiser_options: dict | None = None,
        diagnostics: bool = False,
        **kwargs,
    ) -> None:
        if handover not in HANDOVERS:
            raise ValueError(f"handover must be one of {HANDOVERS}, got {handover!r}")
        if diagnostics:
            raise ValueError("denoise.diagnostics needs the whole clipped gradient in one process: run it single-process")
        super().__init__(model, optimizer, denoiser_options=None, **kwargs)
        self.env, self.handover = env, handover
        named = {self.clipper.names[p]: p for p in self.parameters}
        self.by_name = named
        options = dict(denoiser_options or {})
        selected: set[str] = set()
        if denoiser_options is not None:
            selected = set(select(named, options.get("include", DEFAULT_INCLUDE), options.get("exclude", ())))
            if not selected:
                raise ValueError(f"no 2-D parameter matches the denoising patterns {options.get('include')}")
        self.denoising = bool(selected)
        self.owners = assign_owners({n: tuple(p.shape) for n, p in named.items()}, selected, env.world_size)
        mine = {n: named[n] for n in sorted(selected) if self.owners[n] == env.rank}
        self.denoiser = GradientDenoiser(mine, **options) if mine else None

    def owns(self, p: nn.Parameter) -> bool:
        return self.owners[self.clipper.names[p]] == self.env.rank

    def reduce_to_owners(self) -> None:
        for p in self.parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.env.distributed:
                dist.reduce(p.grad, dst=self.owners[self.clipper.names[p]])

    def add_noise(self) -> None:
        for p in self.parameters:
            if self.owns(p):
                p.grad.add_(self.noise.sample(self.step_index, self.clipper.names[p], p).to(p.dtype))

    def denoise(self) -> dict:
        if not self.denoising or self.step_index % self.denoise_every:
            return {}
        stats = self.denoiser(self.noise.std) if self.denoiser is not None else None
        local = [stats.matrices, stats.denoised, stats.mean_kept_rank * stats.denoised] if stats else [0.0, 0.0, 0.0]
        matrices, denoised, rank_sum = self.env.sum_floats(local)
        return {"denoised_fraction": denoised / max(matrices, 1), "mean_kept_rank": rank_sum / denoised if denoised else 0.0}

    def average(self) -> None:
        for p in self.parameters:
            if self.owns(p):
                p.grad.div_(self.expected_batch_size)
            else:
                p.grad.zero_()  # a reduce leaves partial sums on non-destination ranks

    def hand_over(self) -> None:
        if not self.env.distributed:
            return
        for p in self.parameters:
            owner = self.owners[self.clipper.names[p]]
            if self.handover == "replicated":
                dist.broadcast(p.grad, src=owner)
            elif owner == self.env.rank:
                p.grad.mul_(self.env.world_size)

    def optimizer_step(self) -> None:
        if self.handover == "deepspeed":
            self.optimizer.reduce_gradients()
        super().optimizer_step()

    def step(self) -> dict:
        self.reduce_to_owners()
        self.add_noise()
        denoise_stats = self.denoise()
        self.average()
        self.hand_over()
        self.optimizer_step()
        self.accountant_step()
        samples, clipped, dropped, norm_sum = self.env.sum_floats(
            [self._samples, self._clipped, self._dropped, self._norm_sum]
        )
        stats = {
            "samples": int(samples),
            "dropped_samples": int(dropped),
            "clipped_fraction": clipped / max(samples, 1),
            "mean_grad_norm": norm_sum / max(samples, 1),
            **denoise_stats,
        }
        self.step_index += 1
        self._reset_stats()
        return stats
