"""DP zeroth-order fine-tuning (DPZero; DP-ZOSO and DP-ZOPO build on it): one step, as stages.

Per direction j = 1..K of a step t, on a Poisson sample of its own:

    perturb      theta += mu z_j, z_j ~ N(0, I) over the trainable parameters, in place, from
                 keyed streams (see Directions): no parameter-sized z is ever held
    forward      per-sample losses l+ on every micro-batch of the direction's sample
    perturb      theta -= 2 mu z_j; forward again (the same dropout masks): l-; theta += mu z_j
    clip         g_i = clamp((l+_i - l-_i) / (2 mu), -C, C); a non-finite g_i counts 0 (dropped)
    sum          in fp64, over the micro-batches and, as one all-reduce of K scalars, over ranks

then, once per step:

    add_noise        N(0, (sigma C)^2) on each direction's sum, from the noise stream of the
                     seed drawn on rank 0 (every rank draws the same numbers: noise added once)
    average          divide by the expected batch size q N
    update           theta -= lr / K * sum_j ghat_j z_j, each z_j regenerated from its streams
    accountant_step  K Poisson-subsampled Gaussian mechanisms

Sensitivity (add/remove one row): the row enters direction j's sum only through its own clipped
scalar, so it moves that sum by at most C; each direction draws its own Poisson sample, so
direction j is exactly a Poisson-subsampled Gaussian mechanism of noise multiplier sigma, and
the K directions of T steps compose adaptively (theta, hence every later g_i, depends on the
data only through earlier noised outputs). The per-sample losses must not mix samples: the
trainer's startup check refuses models where they do. z is data-independent and carries no
privacy; it comes from the run's public seed, so a resumed run regenerates it.

DP-ZOSO's stagewise schedule (``StageSchedule``): stage s lasts n 2^s steps; the step size halves
at each new stage and mu falls geometrically to its last stage's value; a regulariser of weight
lambda pulls theta towards the stage's starting point theta_s (the gradient of
lambda / 2 ||theta - theta_s||^2 joins the update: theta -= lr lambda (theta - theta_s)). DP-ZOPO's data-free
selection (``zo_selection.py``) restricts z to a fixed subset of the entries, so only those are
perturbed and updated. Both are public (neither reads training data): they change neither the
sensitivity argument nor the accounting. Without either, the step is DPZero's.

Distributed: every rank holds the same seeds and perturbs what it holds (the whole model when
replicated, its FSDP2 shard or ZeRO-3 partition when sharded: a shard's entries are drawn exactly
as a whole copy's would be); only the K sums and a few statistics are all-reduced. With FSDP2 and
ZeRO-3 every rank runs the same number of forwards (the trainer pads short shares), as the
parameter gathers need.
"""

from __future__ import annotations

import hashlib
import math
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from dpllm.distributed.env import DistEnv
from dpllm.privacy.accountant import PrivacyAccountant
from dpllm.privacy.noise import GaussianNoise
from dpllm.steps.batches import MicroBatch

# Entries per stream: a rank holding any flat range of a parameter draws at most one stream's
# entries it does not keep at each end of the range. Below torch's grain size (32768), so the
# drawing threads never start OpenMP teams of their own.
PIECE = 1 << 15


@dataclass(frozen=True)
class StageSchedule:
    """DP-ZOSO's stages: stage s (0-based, ``stages`` of them) covers steps
    [n (2^s - 1), n (2^(s+1) - 1)) for ``first_steps`` = n, the last one running to the end.
    In stage s the step size is ``lr / 2^s`` and mu is ``mu (mu_end / mu)^(s / (stages - 1))``
    (constant without ``mu_end``). One stage is DPZero's constant lr and mu."""

    lr: float
    mu: float
    stages: int = 1
    first_steps: int = 0
    mu_end: float | None = None
    regularization: float = 0.0  # lambda: the pull towards the stage's starting point

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.mu > 0) or self.stages < 1 or (self.stages > 1 and self.first_steps < 1):
            raise ValueError(f"need lr > 0, mu > 0, stages >= 1 and, with several stages, first_steps >= 1: {self}")
        if self.mu_end is not None and not self.mu_end > 0:
            raise ValueError(f"mu_end must be > 0, got {self.mu_end}")
        if not self.regularization >= 0:
            raise ValueError(f"regularization must be >= 0, got {self.regularization}")

    def starts_stage(self, step: int) -> bool:
        return step == 0 or self.stage(step) != self.stage(step - 1)

    def stage(self, step: int) -> int:
        s = 0
        while s < self.stages - 1 and step >= self.first_steps * (2 ** (s + 1) - 1):
            s += 1
        return s

    def lr_at(self, step: int) -> float:
        return self.lr * 0.5 ** self.stage(step)

    def mu_at(self, step: int) -> float:
        if self.mu_end is None or self.stages == 1:
            return self.mu
        return self.mu * (self.mu_end / self.mu) ** (self.stage(step) / (self.stages - 1))


class Directions:
    """Standard normal directions over named tensors, keyed by (seed, step, direction, name, piece):
    piece p of a parameter's flattened entries [p * PIECE, (p + 1) * PIECE) comes from a generator
    seeded by a hash of the key, so what a rank draws does not depend on how the parameter is
    split over ranks, on the order parameters are visited or on the number of threads."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_width = 0

    def _stream_seed(self, step: int, direction: int, name: str, piece: int) -> int:
        key = f"{self.seed}:{step}:{direction}:{name}:{piece}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)

    def add_(
        self, step: int, direction: int, views: list[tuple[str, Tensor, int, int]], alpha: float,
        masks: dict[str, Tensor] | None = None,
    ) -> None:
        """``flat += alpha * z[offset : offset + flat.numel()]`` for each ``(name, flat, offset, numel)``:
        ``flat`` holds entries from ``offset`` on of a parameter of ``numel`` entries in all.
        ``masks``: per name, a boolean tensor like ``flat``; z is zero where it is False."""
        jobs = []
        for name, flat, offset, numel in views:
            end = offset + flat.numel()
            mask = None if masks is None else masks[name]
            for piece in range(offset // PIECE, -(-end // PIECE)):
                start = piece * PIECE
                length = min(PIECE, numel - start)
                lo, hi = max(offset, start), min(end, start + length)
                seed = self._stream_seed(step, direction, name, piece)
                keep = None if mask is None else mask[lo - offset : hi - offset]
                jobs.append((seed, length, lo - start, flat[lo - offset : hi - offset], keep))
        if not jobs:
            return
        like = jobs[0][3]
        if like.device.type != "cpu":
            slot = _slot(like)
            for job in jobs:
                _draw_and_add(slot, job, alpha)
            return
        width = max(1, torch.get_num_threads())
        slots = queue.SimpleQueue()
        for _ in range(min(width, len(jobs))):
            slots.put(_slot(like))

        def run(job):
            slot = slots.get()
            _draw_and_add(slot, job, alpha)
            slots.put(slot)

        if self._pool_width != width:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool, self._pool_width = ThreadPoolExecutor(max_workers=width, thread_name_prefix="dp-zo"), width
        list(self._pool.map(run, jobs))


def _slot(like: Tensor) -> tuple[torch.Generator, dict]:
    return torch.Generator(device=like.device), {}


def _draw_and_add(slot, job, alpha: float) -> None:
    """Draw the job's piece in its target's precision (fp32 at least: a parameter's entries are
    the same numbers on every rank, whichever parameters a rank holds) and add its slice."""
    generator, buffers = slot
    seed, length, skip, target, keep = job
    dtype = torch.promote_types(target.dtype, torch.float32)
    if dtype not in buffers:
        buffers[dtype] = torch.empty(PIECE, dtype=dtype, device=target.device)
    generator.manual_seed(seed)
    drawn = buffers[dtype][:length].normal_(generator=generator)[skip : skip + target.numel()]
    if keep is not None:
        drawn.masked_fill_(~keep, 0.0)
    target.add_(drawn, alpha=alpha)


def fresh_forwards(model: nn.Module) -> Callable[[], None]:
    """What to call after changing parameters in place so that the next forward sees them: FSDP2
    keeps its root unit's parameters gathered after a forward (for the backward it expects) and
    would run the next forward on that stale copy; resharding it makes that forward gather again.
    ZeRO-3 gathers from the partitions the step changes; a partition still gathered (kept for
    reuse, or persistent) is released, so that the next forward gathers it again."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return model.reshard
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    if partitioned:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        def release() -> None:
            gathered = [p for p in partitioned if p.ds_status == ZeroParamStatus.AVAILABLE]
            if gathered:
                gathered[0].partition(param_list=gathered, has_been_updated=False)

        return release
    return lambda: None


def local_views(params: dict[str, nn.Parameter], env: DistEnv) -> list[tuple[str, Tensor, int, int]]:
    """(name, this rank's entries flattened, their offset in the whole parameter, its numel). An
    FSDP2 parameter is a DTensor sharded on dim 0 in torch.chunk pieces; a ZeRO-3 parameter keeps
    piece r of its flattened entries (equal pieces, the last padded) in ``ds_tensor``; others are
    whole here."""
    from torch.distributed.tensor import DTensor

    views = []
    for name, p in params.items():
        data, offset, numel = p.detach(), 0, p.numel()
        if hasattr(p, "ds_tensor"):
            piece, numel = p.ds_tensor.numel(), p.ds_numel
            offset = min(env.rank * piece, numel)
            data = p.ds_tensor.detach().view(-1)[: min(piece, numel - offset)]
        elif isinstance(data, DTensor):
            rows = math.ceil(p.shape[0] / env.world_size)
            offset = min(env.rank * rows, p.shape[0]) * (p.numel() // max(p.shape[0], 1))
            data = data.to_local()
        if not data.is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous: the zeroth-order step perturbs parameters in place")
        if data.numel():
            views.append((name, data.view(-1), offset, numel))
    return views


class ZerothOrderStep:
    """The DP zeroth-order step, through the trainer's step interface (``run`` then ``step``)."""

    optimizer = None  # the update is plain SGD along the directions: no optimizer state

    def __init__(
        self,
        model: nn.Module,
        *,
        env: DistEnv,
        max_grad_norm: float,
        noise: GaussianNoise,
        noise_multiplier: float,
        sample_rate: float,
        expected_batch_size: float,
        accountant: PrivacyAccountant,
        directions: int,
        schedule: StageSchedule,
        direction_seed: int,
        lockstep: bool = False,
        masks: dict[str, Tensor] | None = None,
        selects: bool = False,
    ) -> None:
        """Build on the model as it trains (FSDP2: after sharding). ``lockstep``: every rank runs
        the padding forwards too (FSDP2 gathers parameters in each). ``masks``: DP-ZOPO's
        selection (``zo_selection.select``), per trainable parameter a boolean tensor over this
        rank's flattened entries; only the True ones are perturbed and updated. ``selects``: the
        run moves a selection, given as ``masks`` or, when resuming, loaded from the checkpoint."""
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0 for a private step, got {noise_multiplier}")
        if not math.isclose(noise.std, noise_multiplier * max_grad_norm, rel_tol=1e-12):
            raise ValueError(
                f"the noise's std {noise.std} is not noise_multiplier * max_grad_norm = {noise_multiplier * max_grad_norm}"
            )
        if directions < 1 or not expected_batch_size > 0:
            raise ValueError(f"need directions >= 1 and an expected batch > 0 (got {directions}, {expected_batch_size})")
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.env, self.noise, self.accountant = env, noise, accountant
        self.max_grad_norm, self.noise_multiplier, self.sample_rate = max_grad_norm, noise_multiplier, sample_rate
        self.expected_batch_size = expected_batch_size
        self.samples_per_step, self.schedule, self.masks = directions, schedule, masks
        self.selects = selects or masks is not None
        self.reference: list[Tensor] | None = None  # this rank's entries at the stage's start (regulariser)
        self.directions = Directions(direction_seed)
        self._regather = fresh_forwards(model)
        self.lockstep = lockstep
        self.step_index = 0
        self._reset()

    def _reset(self) -> None:
        self._sums = torch.zeros(self.samples_per_step, dtype=torch.float64)
        self._counts = torch.zeros(4, dtype=torch.float64)  # samples, clipped, dropped, sum of |g_i|

    def state_dict(self) -> dict:
        """The direction seed, so a resumed run draws the directions an uninterrupted one would."""
        return {"direction_seed": self.directions.seed}

    def load_state_dict(self, state: dict) -> None:
        self.directions = Directions(state["direction_seed"])

    def rank_state(self) -> dict:
        """DP-ZOPO's selection of this rank's entries: a resumed run moves the same ones (selecting
        again would need the base weights, which a resumed run no longer holds); the regulariser's
        stage starting point."""
        state = {"masks": self.masks} if self.masks is not None else {}
        if self.reference is not None:
            state["reference"] = self.reference
        return state

    def load_rank_state(self, state: dict) -> None:
        if self.schedule.regularization > 0 and not self.schedule.starts_stage(self.step_index):
            if "reference" not in state:
                raise ValueError("zo.regularization: the checkpoint holds no stage starting point; resume it with zo.regularization=0")
            self.reference = state["reference"]
        masks = state.get("masks")
        if self.selects != (masks is not None):
            raise ValueError(
                "zo.select_fraction: the checkpoint was written by a run "
                + ("without a DP-ZOPO selection; resume it with zo.select_fraction=1" if masks is None else
                   "with a DP-ZOPO selection; resume it with that run's zo.select_fraction")
            )
        self.masks = masks

    @property
    def mu(self) -> float:
        return self.schedule.mu_at(self.step_index)

    @property
    def lr(self) -> float:
        return self.schedule.lr_at(self.step_index)

    def _move(self, direction: int, alpha: float) -> None:
        self.directions.add_(self.step_index, direction, local_views(self.params, self.env), alpha, self.masks)
        self._regather()

    def _regularise(self, lr: float) -> None:
        """theta -= lr lambda (theta - theta_s), theta_s this stage's starting point (kept from the
        stage's first step on; at that step the pull is zero)."""
        lam = self.schedule.regularization
        if lam == 0:
            return
        views = [flat for _, flat, _, _ in local_views(self.params, self.env)]
        if self.reference is None or self.schedule.starts_stage(self.step_index):
            self.reference = [flat.clone() for flat in views]
            return
        for flat, start in zip(views, self.reference):  # as a difference: entries at their start stay bit for bit
            flat.sub_(torch.sub(flat, start).mul_(lr * lam))

    def run(self, draws: list[list[MicroBatch]], forward: Callable[[dict], Tensor]) -> list[Tensor]:
        """Both forwards of every direction, each on its own sample's micro-batches; returns the
        mean of each sample's two losses (for the training log)."""
        if len(draws) != self.samples_per_step:
            raise ValueError(f"expected {self.samples_per_step} samples (one per direction), got {len(draws)}")
        losses = []
        with torch.no_grad():
            for j, micros in enumerate(draws):
                micros = [mb for mb in micros if self.lockstep or not mb.padding]
                state = _rng_state()
                self._move(j, self.mu)
                plus = [forward(mb.batch) for mb in micros]
                _set_rng_state(state)  # the same dropout masks for both forwards
                self._move(j, -2 * self.mu)
                minus = [forward(mb.batch) for mb in micros]
                self._move(j, self.mu)
                for mb, lp, lm in zip(micros, plus, minus):
                    if not mb.padding:
                        self._clip_and_sum(j, lp, lm)
                        losses.append(((lp.float() + lm.float()) / 2).cpu())
        return losses

    def _clip_and_sum(self, direction: int, plus: Tensor, minus: Tensor) -> None:
        g = (plus.double().cpu() - minus.double().cpu()) / (2 * self.mu)
        finite = torch.isfinite(g)
        g = g.where(finite, 0.0)
        self._sums[direction] += g.clamp(-self.max_grad_norm, self.max_grad_norm).sum()
        self._counts += torch.tensor(
            [finite.sum(), (g.abs() > self.max_grad_norm).sum(), (~finite).sum(), g.abs().sum()], dtype=torch.float64
        )

    def step(self) -> dict:
        totals = torch.tensor(self.env.sum_floats([*self._sums.tolist(), *self._counts.tolist()]), dtype=torch.float64)
        k = self.samples_per_step
        sums, (samples, clipped, dropped, abs_sum) = totals[:k], totals[k:].tolist()
        noisy = sums + self.noise.sample(self.step_index, "zeroth-order", sums)  # add_noise
        estimates = noisy / self.expected_batch_size  # average
        lr, mu = self.lr, self.mu
        with torch.no_grad():  # update
            self._regularise(lr)
            for j, g in enumerate(estimates.tolist()):
                self._move(j, -lr * g / self.samples_per_step)
        self.accountant.step(self.noise_multiplier, self.sample_rate, count=self.samples_per_step)
        self.step_index += 1
        self._reset()
        return {
            "samples": int(samples),
            "dropped_samples": int(dropped),
            "clipped_fraction": clipped / max(samples, 1),
            "mean_grad_norm": abs_sum / max(samples, 1),  # mean |g_i|, before clipping
            "zo_lr": lr,
            "zo_mu": mu,
        }


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])
