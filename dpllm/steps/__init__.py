"""Step kinds, one per file, below the trainer and above privacy, denoise and distributed:
``private`` (DP-SGD's named stages in one process, and the non-private baseline) and
``sharded`` (the same stages over ranks: owners, reduce, noise, denoise, hand-over)."""

from dpllm.steps.private import NonPrivateStep, PrivateStep
from dpllm.steps.sharded import ShardedPrivateStep

__all__ = ["NonPrivateStep", "PrivateStep", "ShardedPrivateStep"]
