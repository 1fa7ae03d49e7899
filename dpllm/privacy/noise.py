"""Noise for the clipped sum, from counter-keyed streams: Gaussian here, the Laplace mixture of
LMO-DP in lmo.py, both on the same streams.

Each parameter's noise at step ``t`` is drawn in chunks of ``CHUNK`` entries, chunk ``k`` from
its own generator seeded by hash(base seed, step, parameter name, k). The noise therefore
does not depend on the order parameters are visited, on gradient accumulation, on how
parameters are sharded over ranks, or on how many threads draw the chunks: on CPU, where
torch's sampler is single-threaded, chunks are drawn in parallel into small reused buffers,
so the stage neither waits on one core nor holds a parameter-sized noise tensor.

The base seed is the secret the guarantee rests on: by default it comes from ``os.urandom``
(:func:`dpllm.privacy.seeds.secret_seed`), so nothing a run publishes lets anyone replay the
noise. ``secure=True`` also refuses to save it (checkpoints then cannot resume the same noise
stream). Floating-point
Gaussian samplers are not exactly Gaussian (finite precision; see Mironov 2012 on such
attacks on the Laplace mechanism); this is the caveat every floating-point DP-SGD shares.
"""

from __future__ import annotations

import hashlib
import math
import queue
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from dpllm.privacy.seeds import secret_seed

CHUNK = 1 << 20  # entries per stream
# On CPU a stream is drawn and added SERIAL_SLICE entries at a time: element-wise ops on fewer
# entries than torch's grain size (32768) stay on the calling thread, so the drawing threads
# never start OpenMP teams of their own, and each thread's buffer is small and stays in cache.
SERIAL_SLICE = 1 << 15


class KeyedNoise:
    """Adds ``scale`` times standard draws (``_draw``, one mechanism's) to named tensors, each
    chunk from its keyed stream. ``clip_norms``: the per-sample clips whose sensitivity the
    mechanism's accounting covers."""

    clip_norms: tuple[str, ...] = ()

    def __init__(self, noise_multiplier: float, max_grad_norm: float, seed: int | None = None, secure: bool = False):
        """``seed``: the secret base seed (default: drawn from ``os.urandom``); ``secure``: never save it."""
        if not 0 <= noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
        if not 0 < max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
        self.scale = noise_multiplier * max_grad_norm
        self.secure = secure
        self._seed = secret_seed() if seed is None else int(seed)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_width = 0

    def _stream_seed(self, step: int, name: str, chunk: int) -> int:
        digest = hashlib.blake2b(f"{self._seed}:{step}:{name}:{chunk}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)

    def add_(self, step: int, targets: dict[str, Tensor], workers: int | None = None) -> None:
        """``targets[name] += scale * draw`` per entry, in place, drawn in fp32 at least.

        ``workers``: threads drawing CPU chunks (default: torch's intra-op thread count); the
        result is the same for any number.
        """
        jobs = []
        for name, target in targets.items():
            if not target.is_contiguous():  # draw into a contiguous copy of its shape, then add
                target.add_(self.sample(step, name, target))
                continue
            flat = target.view(-1)
            for k, start in enumerate(range(0, flat.numel(), CHUNK)):
                jobs.append((self._stream_seed(step, name, k), flat[start : start + CHUNK]))
        if not jobs:
            return
        largest = max(target.numel() for _, target in jobs)
        if jobs[0][1].device.type != "cpu":
            slot = self._slot(jobs[0][1], largest)
            for job in jobs:
                self._draw_and_add(slot, job)
            return
        width = max(1, workers or torch.get_num_threads())
        slots = queue.SimpleQueue()
        for _ in range(min(width, len(jobs))):
            slots.put(self._slot(jobs[0][1], min(largest, SERIAL_SLICE)))  # buffers made here; workers only fill them

        def run(job):
            slot = slots.get()
            self._draw_and_add(slot, job)
            slots.put(slot)

        jobs.sort(key=lambda job: -job[1].numel())  # largest first balances the threads
        list(self._threads(width).map(run, jobs))

    def _draw_and_add(self, slot: tuple[torch.Generator, Tensor], job: tuple[int, Tensor]) -> None:
        """target += scale * (standard draws from the job's stream), one buffer-full at a time."""
        generator, buffer = slot
        seed, target = job
        generator.manual_seed(seed)
        for start in range(0, target.numel(), buffer.numel()):
            piece = target[start : start + buffer.numel()]
            piece.add_(self._draw(generator, buffer[: piece.numel()]), alpha=self.scale)

    def _draw(self, generator: torch.Generator, buffer: Tensor) -> Tensor:
        """``buffer`` filled with the mechanism's draws at scale 1, from ``generator``."""
        raise NotImplementedError

    def _slot(self, like: Tensor, size: int) -> tuple[torch.Generator, Tensor]:
        dtype = torch.promote_types(like.dtype, torch.float32)
        return torch.Generator(device=like.device), torch.empty(size, dtype=dtype, device=like.device)

    def _threads(self, width: int) -> ThreadPoolExecutor:
        if self._pool_width != width:
            if self._pool is not None:
                self._pool.shutdown(wait=False)  # idle between calls: its threads exit at once
            self._pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="dp-noise")
            self._pool_width = width
        return self._pool

    def sample(self, step: int, name: str, like: Tensor) -> Tensor:
        """The noise ``add_`` would add to a tensor shaped like ``like`` (fp32 at least)."""
        out = torch.zeros(like.shape, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
        self.add_(step, {name: out})
        return out

    def state_dict(self) -> dict:
        if self.secure:
            raise RuntimeError("secure-mode noise state is never saved; a resumed run draws a fresh seed")
        # Checkpoints hold this: they are as secret as the training data.
        return {"seed": self._seed}

    def load_state_dict(self, state: dict) -> None:
        self._seed = int(state["seed"])


class GaussianNoise(KeyedNoise):
    """N(0, (noise_multiplier * max_grad_norm)^2) per entry; an L1 clip bounds the L2 norm too."""

    clip_norms = ("l2", "l1")

    @property
    def std(self) -> float:
        return self.scale

    @std.setter
    def std(self, value: float) -> None:
        self.scale = value

    def _draw(self, generator: torch.Generator, buffer: Tensor) -> Tensor:
        return buffer.normal_(generator=generator)
