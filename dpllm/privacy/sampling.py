"""Poisson sampling: every example joins each logical batch independently with probability q.

This is the sampling scheme the accountant assumes; shuffled fixed-size batches are not.
Logical batches are cut into micro-batches of at most ``max_micro_batch`` examples so that a
large expected batch fits in memory; an empty logical batch is a valid (noise-only) step.
"""

from __future__ import annotations

import torch

from dpllm.privacy.seeds import secret_seed


class PoissonSampler:
    def __init__(self, num_examples: int, sample_rate: float, seed: int | None = None, secure: bool = False):
        """``seed``: secret (default: drawn from ``os.urandom``), since who was sampled is part of
        what the guarantee hides; ``secure``: never save the generator state."""
        if num_examples <= 0:
            raise ValueError(f"cannot sample from an empty dataset (num_examples={num_examples})")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_examples = num_examples
        self.sample_rate = sample_rate
        self.generator = torch.Generator()
        self.generator.manual_seed((secret_seed() if seed is None else int(seed)) & (2**64 - 1))
        self.secure = secure

    def sample(self) -> list[int]:
        """Indices of the next logical batch, in increasing order."""
        draws = torch.rand(self.num_examples, generator=self.generator)
        return torch.nonzero(draws < self.sample_rate).flatten().tolist()

    def state_dict(self) -> dict:
        if self.secure:
            raise RuntimeError("secure-mode sampler state is never saved")
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def rank_share(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of a logical batch (every world_size-th index)."""
    return indices[rank::world_size]


def micro_batches(indices: list[int], max_micro_batch: int) -> list[list[int]]:
    if max_micro_batch <= 0:
        raise ValueError(f"max_micro_batch must be > 0, got {max_micro_batch}")
    return [indices[i : i + max_micro_batch] for i in range(0, len(indices), max_micro_batch)]
