"""Multi-process private training: process groups and matrix ownership (the sharded step itself is
dpllm.steps.sharded)."""

from dpllm.distributed.env import DistEnv, init_distributed
from dpllm.distributed.ownership import assign_owners

__all__ = ["DistEnv", "assign_owners", "init_distributed"]
