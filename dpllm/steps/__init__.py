"""Step kinds, one per file, below the trainer and above privacy, denoise and distributed:
``private`` (DP-SGD's named stages in one process, and the non-private baseline), ``sharded``
(the same stages over ranks: owners, reduce, noise, denoise, hand-over) and ``zeroth_order``
(DP zeroth-order: two forwards along seeded directions, clipped and noised scalars; DP-ZOSO's
stages and, in ``zo_selection``, DP-ZOPO's data-free choice of the entries it moves). Each takes
the step's micro-batches through ``run`` and finishes the step with ``step``."""

from dpllm.steps.batches import MicroBatch
from dpllm.steps.private import NonPrivateStep, PrivateStep
from dpllm.steps.sharded import ShardedPrivateStep
from dpllm.steps import zo_selection
from dpllm.steps.zeroth_order import StageSchedule, ZerothOrderStep

__all__ = ["MicroBatch", "NonPrivateStep", "PrivateStep", "ShardedPrivateStep", "StageSchedule", "ZerothOrderStep", "zo_selection"]
