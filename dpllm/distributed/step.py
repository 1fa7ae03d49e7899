"""The private step over several processes.

    clip_and_accumulate   each rank clips its own share of the Poisson sample into full-shape
                          fp32 (fp64 for fp64 models) sums, whatever the parameter dtype
    reduce_to_owners      each parameter's clipped sum is summed over ranks onto its owner
                          (one reduce per parameter, in that precision)
    add_noise             the owner adds N(0, (sigma C)^2) from the parameter's own stream, keyed
                          by (seed drawn on rank 0, step, name): once, whatever the world size
    denoise               each owner denoises the projection matrices it owns (the SVD work is
                          balanced over ranks, see ownership.py); statistics summed over ranks
    average               divide by the expected batch size q N; non-owners hold zeros
    hand_over             the result reaches the ranks that update the parameter, cast once to
                          the parameter dtype:
                            replicated  broadcast from the owner (torchrun, DDP-style)
                            deepspeed   ZeRO-1/2's own reduce-scatter into optimizer partitions
                                        (the owner's value times the world size, zeros elsewhere:
                                        ZeRO averages over ranks)
                            fsdp        scatter of dim-0 chunks from the owner into FSDP2's shards
    optimizer_step, accountant_step   as in one process

Norm correction is per matrix ("noisy" or "estimate" rescale each matrix by its own norms), so it
needs no exchange beyond the owner. Communication per step: a reduce plus a broadcast,
reduce-scatter or scatter of the gradient, at most one all-reduce's volume, and 7 scalars.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpllm.denoise.gradient import DEFAULT_INCLUDE, GradBuffer, GradientDenoiser, select
from dpllm.distributed.env import DistEnv
from dpllm.distributed.ownership import assign_owners
from dpllm.training.private_step import PrivateStep

HANDOVERS = ("replicated", "deepspeed", "fsdp")


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
        """For ``handover="fsdp"`` build the step on the unsharded model (its hooks stay on the
        modules), then shard the model and call :meth:`use_sharded`."""
        if handover not in HANDOVERS:
            raise ValueError(f"handover must be one of {HANDOVERS}, got {handover!r}")
        if diagnostics:
            raise ValueError("denoise.diagnostics needs the whole clipped gradient in one process: run it single-process")
        if handover == "fsdp":
            kwargs["clipper_options"] = {"verify_first_backward": False}
        super().__init__(model, optimizer, denoiser_options=None, **kwargs)
        self.env, self.handover = env, handover
        shapes = self.clipper.shapes
        options = dict(denoiser_options or {})
        selected: set[str] = set()
        if denoiser_options is not None:
            buffers = {n: GradBuffer(shape) for n, shape in shapes.items()}
            selected = set(select(buffers, options.get("include", DEFAULT_INCLUDE), options.get("exclude", ())))
            if not selected:
                raise ValueError(f"no 2-D parameter matches the denoising patterns {options.get('include')}")
        self.denoising = bool(selected)
        self.owners = assign_owners({n: tuple(s) for n, s in shapes.items()}, selected, env.world_size)
        self._buffers = {n: GradBuffer(shapes[n]) for n in sorted(selected) if self.owners[n] == env.rank}
        self.denoiser = GradientDenoiser(self._buffers, **options) if self._buffers else None

    def use_sharded(self, model: nn.Module, optimizer) -> None:
        """Point the step at the sharded parameters (FSDP2 replaces the parameter objects)."""
        current = dict(model.named_parameters())
        self.params = {n: current[n] for n in self.clipper.shapes}
        self.optimizer = optimizer

    def reduce_to_owners(self) -> None:
        if self.env.distributed:
            for name, g in self._complete_sums().items():
                dist.reduce(g, dst=self.owners[name])

    def add_noise(self) -> None:
        owned = {name: g for name, g in self._complete_sums().items() if self.owners[name] == self.env.rank}
        self.noise.add_(self.step_index, owned)

    def denoise(self) -> dict:
        if not self.denoising or not self._denoise_due():
            return {}
        local = [0.0, 0.0, 0.0]
        if self.denoiser is not None:
            for name, buffer in self._buffers.items():
                buffer.grad = self.sums[name]
            stats = self.denoiser(self.noise.std)
            local = [stats.matrices, stats.denoised, stats.mean_kept_rank * stats.denoised]
        matrices, denoised, rank_sum = self.env.sum_floats(local)
        return {"denoised_fraction": denoised / max(matrices, 1), "mean_kept_rank": rank_sum / denoised if denoised else 0.0}

    def average(self) -> None:
        for name, g in self.sums.items():
            if self.owners[name] == self.env.rank:
                g.div_(self.expected_batch_size)
            else:
                g.zero_()  # a reduce leaves partial sums on non-destination ranks

    def hand_over(self) -> None:
        """Set every rank's ``p.grad`` (in the parameter dtype) from the owners' results."""
        for name, g in self.sums.items():
            owner, p = self.owners[name], self.params[name]
            if self.handover == "fsdp":
                self._scatter_into_shard(name, g, owner)
                continue
            if self.env.distributed and self.handover == "replicated":
                dist.broadcast(g, src=owner)
            elif self.env.distributed and owner == self.env.rank:  # deepspeed: ZeRO averages over ranks
                g.mul_(self.env.world_size)
            p.grad = g.to(p.dtype)
        self.sums.clear()

    def _scatter_into_shard(self, name: str, full: Tensor, owner: int) -> None:
        """FSDP2 shards dim 0 in torch.chunk pieces: pad to equal chunks, scatter, trim."""
        from torch.distributed.tensor import DTensor

        p = self.params[name]
        if not isinstance(p, DTensor):
            p.grad = full.to(p.dtype)
            return
        world, rows = self.env.world_size, full.shape[0]
        size = math.ceil(rows / world)
        local_rows = p.to_local().shape[0]
        out = torch.empty((size, *full.shape[1:]), dtype=full.dtype, device=full.device)
        chunks = None
        if owner == self.env.rank:
            padded = torch.zeros((size * world, *full.shape[1:]), dtype=full.dtype, device=full.device)
            padded[:rows] = full
            chunks = list(padded.chunk(world))
        dist.scatter(out, chunks, src=owner)
        local = out[:local_rows].to(p.dtype).contiguous()
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    def optimizer_step(self) -> None:
        if self.handover == "deepspeed":
            self.optimizer.reduce_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> dict:
        """The stages after the last micro-batch; statistics include seconds spent communicating
        (reduce and hand-over, waiting for slower ranks included) and denoising."""
        t0 = time.perf_counter()
        self.reduce_to_owners()
        t1 = time.perf_counter()
        self.add_noise()
        t2 = time.perf_counter()
        denoise_stats = self.denoise()
        t3 = time.perf_counter()
        self.average()
        t4 = time.perf_counter()
        self.hand_over()
        t5 = time.perf_counter()
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
            "comm_s": round((t1 - t0) + (t5 - t4), 6),
            "denoise_s": round(t3 - t2, 6),
            **denoise_stats,
        }
        self.step_index += 1
        self._reset_stats()
        return stats
