"""What the trainer hands a step: the micro-batches of each Poisson sample it drew."""

from __future__ import annotations

from typing import NamedTuple


class MicroBatch(NamedTuple):
    batch: dict  # collated tensors on the training device
    padding: bool  # run only to keep collectives in lockstep with busier ranks; adds nothing
