"""Gaussian noise for the clipped sum, from per-parameter streams.

Each parameter's noise at step ``t`` comes from its own generator seeded by
hash(base seed, step, parameter name), so the noise does not depend on the order parameters
are visited, on gradient accumulation, or (later) on how parameters are sharded over ranks.

Secure mode draws the base seed from ``os.urandom`` and never exposes it. Floating-point
Gaussian samplers are not exactly Gaussian (finite precision; see Mironov 2012 on such
attacks on the Laplace mechanism); this is the caveat every floating-point DP-SGD shares.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import Tensor


class GaussianNoise:
    def __init__(self, noise_multiplier: float, max_grad_norm: float, seed: int | None = None, secure: bool = False):
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if secure and seed is not None:
            raise ValueError("secure mode draws its own seed from os.urandom; do not pass one")
        if not secure and seed is None:
            raise ValueError("give a seed, or use secure=True")
        self.std = noise_multiplier * max_grad_norm
        self.secure = secure
        self._seed = int.from_bytes(os.urandom(8), "little") if secure else int(seed)

    def share_seed(self, broadcast) -> None:
        """Make every rank use rank 0's seed; ``broadcast(value) -> rank 0's value``. The seed is never logged."""
        self._seed = int(broadcast(self._seed))

    def generator(self, step: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
        digest = hashlib.blake2b(f"{self._seed}:{step}:{name}".encode(), digest_size=8).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def sample(self, step: int, name: str, like: Tensor) -> Tensor:
        """N(0, std^2) noise shaped like ``like`` (drawn in fp32 at least)."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        gen = self.generator(step, name, like.device)
        return torch.randn(like.shape, generator=gen, dtype=dtype, device=like.device) * self.std

    def state_dict(self) -> dict:
        if self.secure:
            raise RuntimeError("secure-mode noise state is never saved; a resumed run draws a fresh seed")
        return {"seed": self._seed}

    def load_state_dict(self, state: dict) -> None:
        self._seed = int(state["seed"])
