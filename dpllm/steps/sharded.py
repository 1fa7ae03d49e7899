"""The private step over several processes.

    clip_and_accumulate   each rank clips its own share of the Poisson sample; as the clipper
      + reduce_to_owners  forms each parameter's clipped micro-batch sum (fp32; fp64 for fp64
                          models) it is summed over ranks onto that parameter's owner and freed
                          elsewhere, so a rank holds full-shape sums only for what it owns (1/N)
                          plus one parameter in flight. Every rank runs the same number of
                          micro-batches (the trainer pads short shares with ones that add zero),
                          so the per-parameter reduces stay matched
    add_noise             the owner adds N(0, (sigma C)^2) from the parameter's own stream, keyed
                          by (seed drawn on rank 0, step, name): once, whatever the world size
    denoise               each owner denoises the projection matrices it owns (the SVD work is
                          balanced over ranks, see ownership.py); statistics summed over ranks
    average               divide by the expected batch size q N
    hand_over             one parameter at a time, the result reaches the ranks that update it,
                          cast once to the parameter dtype, and the owner's sum is freed:
                            replicated  broadcast from the owner (torchrun, DDP-style)
                            deepspeed   ZeRO-1/2's own reduce-scatter into optimizer partitions
                                        (the owner's value times the world size, zeros elsewhere:
                                        ZeRO averages over ranks)
                            fsdp        scatter of dim-0 chunks from the owner into FSDP2's shards
                            zero3       scatter of the flattened parameter's pieces from the owner
                                        into ZeRO-3's fp32 gradient partitions
    optimizer_step, accountant_step   as in one process

Norm correction is per matrix ("noisy" or "estimate" rescale each matrix by its own norms), so it
needs no exchange beyond the owner. Communication per step: a reduce of the gradient per
micro-batch, a broadcast, reduce-scatter or scatter of it once, and 7 scalars.
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
from dpllm.distributed.zero3 import backward_hook_replay
from dpllm.steps.private import PrivateStep

HANDOVERS = ("replicated", "deepspeed", "fsdp", "zero3")


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
        """For ``handover="fsdp"`` or ``"zero3"`` build the step on the unsharded model (its hooks
        stay on the modules), then shard the model and call :meth:`use_sharded`."""
        if handover not in HANDOVERS:
            raise ValueError(f"handover must be one of {HANDOVERS}, got {handover!r}")
        if diagnostics:
            raise ValueError("denoise.diagnostics needs the whole clipped gradient in one process: run it single-process")
        # The check against autograd accumulates gradients, which would fire the engines' own
        # gradient hooks: the trainer runs it on rank 0's model before the engine wraps it.
        kwargs["clipper_options"] = {**(kwargs.get("clipper_options") or {}), "verify_first_backward": False}
        if handover == "zero3":  # two_pass's second backward must fetch the partitions again
            kwargs["clipper_options"]["replay_backward_hooks"] = backward_hook_replay(model)
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
        idle = sorted(set(range(env.world_size)) - set(self.owners.values()))
        if idle:
            raise ValueError(
                f"{env.world_size} processes but only {len(shapes)} trainable parameter tensor(s): each rank owns whole "
                f"tensors (their noise and denoising), so ranks {idle} would own nothing; run at most {len(shapes)} "
                "processes or train more tensors"
            )
        self._buffers = {n: GradBuffer(shapes[n]) for n in sorted(selected) if self.owners[n] == env.rank}
        self.denoiser = GradientDenoiser(self._buffers, **options) if self._buffers else None

    def release_parameters(self) -> None:
        """Drop the step's references to the full parameters before FSDP2 shards them (it frees
        them unit by unit as it goes); :meth:`use_sharded` then points the step at the shards."""
        self.clipper.release_parameters()
        self.params = {}

    def use_sharded(self, model: nn.Module, optimizer) -> None:
        """Point the step at the sharded parameters (FSDP2 replaces the parameter objects) and the
        optimizer that updates them (FSDP2's on the shards, or DeepSpeed's)."""
        self.clipper.rebind(dict(model.named_parameters()))
        self.params = dict(self.clipper.by_name)
        self.optimizer = optimizer

    def accumulate(self, name: str, clipped: Tensor | None) -> None:
        """reduce_to_owners, as the clipper forms each parameter's sum (per micro-batch): the
        sum goes to its owner, the full-shape buffer is dropped elsewhere."""
        t0 = time.perf_counter()
        owner = self.owners[name]
        if clipped is None:
            clipped = self._zeros(name)
        if self.env.distributed:
            dist.reduce(clipped, dst=owner)
        if owner == self.env.rank:
            super().accumulate(name, clipped)
        self._comm_s += time.perf_counter() - t0

    def _complete_sums(self) -> dict[str, Tensor]:
        """This rank's owned sums, zeros for those no sample reached."""
        for name in self.clipper.shapes:
            if self.owners[name] == self.env.rank and name not in self.sums:
                self.sums[name] = self._zeros(name)
        return self.sums

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

    def hand_over(self) -> None:
        """Set every rank's ``p.grad`` (in the parameter dtype) from the owners' results, one
        parameter at a time in a fixed order; each owner's sum is freed once handed over."""
        for name in self.clipper.shapes:
            owner, p = self.owners[name], self.params[name]
            g = self.sums.pop(name, None)  # None on the ranks that do not own it
            if self.handover == "fsdp":
                self._scatter_into_shard(name, g, owner)
                continue
            if self.handover == "zero3":
                self._scatter_into_partition(name, g, owner)
                continue
            if self.handover == "replicated":
                if g is None:
                    g = torch.empty_like(self._zeros(name))
                if self.env.distributed:
                    dist.broadcast(g, src=owner)
            elif g is None:  # deepspeed: zeros off the owner, and ZeRO averages over ranks
                g = self._zeros(name)
            else:
                g.mul_(self.env.world_size)
            p.grad = g.to(p.dtype)

    def _scatter_into_shard(self, name: str, full: Tensor | None, owner: int) -> None:
        """FSDP2 shards dim 0 in torch.chunk pieces: scatter equal padded pieces, trim."""
        from torch.distributed.tensor import DTensor

        p = self.params[name]
        if not isinstance(p, DTensor):
            p.grad = full.to(p.dtype)
            return
        local = p.to_local()
        piece = self._scatter_pieces(full, owner, (math.ceil(p.shape[0] / self.env.world_size), *p.shape[1:]), local.device)
        local = piece[: local.shape[0]].to(p.dtype).contiguous()
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    def _scatter_into_partition(self, name: str, full: Tensor | None, owner: int) -> None:
        """ZeRO-3 keeps rank r's piece r of the flattened parameter (equal pieces, the last padded)
        and its fp32 gradient partition: scatter the pieces from the owner and write them there."""
        from deepspeed.utils import safe_set_local_grad

        p = self.params[name]
        flat = None if full is None else full.flatten()
        safe_set_local_grad(p, self._scatter_pieces(flat, owner, (p.ds_tensor.numel(),), p.ds_tensor.device))

    def _scatter_pieces(self, full: Tensor | None, owner: int, piece_shape: tuple, device) -> Tensor:
        """Rank r receives piece r of the owner's ``full`` (zero-padded along dim 0 to world_size
        pieces of ``piece_shape``), in the sums' precision."""
        world = self.env.world_size
        dtype = torch.promote_types(next(iter(self.params.values())).dtype, torch.float32)
        out = torch.empty(piece_shape, dtype=dtype, device=device)
        chunks = None
        if owner == self.env.rank:
            padded = full.contiguous()
            if full.shape[0] != piece_shape[0] * world:  # pad only when the pieces do not divide it
                padded = torch.zeros((piece_shape[0] * world, *piece_shape[1:]), dtype=full.dtype, device=full.device)
                padded[: full.shape[0]] = full
            chunks = list(padded.chunk(world))
        if self.env.distributed:
            dist.scatter(out, chunks, src=owner)
        else:
            out.copy_(chunks[0])
        return out

    def optimizer_step(self) -> None:
        if self.handover == "deepspeed":
            self.optimizer.reduce_gradients()
        elif self.handover == "zero3":  # the partitions hold the gradients; point ZeRO-3's step at them
            self.optimizer.independent_gradient_partition_epilogue()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> dict:
        """The stages after the last micro-batch; statistics include seconds spent communicating
        (reduce and hand-over, waiting for slower ranks included) and denoising."""
        self.add_noise()
        t0 = time.perf_counter()
        denoise_stats = self.denoise()
        t1 = time.perf_counter()
        self.average()
        t2 = time.perf_counter()
        self.hand_over()
        t3 = time.perf_counter()
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
            "comm_s": round(self._comm_s + (t3 - t2), 6),
            "denoise_s": round(t1 - t0, 6),
            **denoise_stats,
        }
        self.step_index += 1
        self._reset_stats()
        return stats

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self._comm_s = 0.0
