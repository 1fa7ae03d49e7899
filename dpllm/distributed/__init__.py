"""Multi-process private training: process groups, matrix ownership and the sharded private step."""

from dpllm.distributed.env import DistEnv, init_distributed
from dpllm.distributed.ownership import assign_owners
from dpllm.distributed.step import ShardedPrivateStep

__all__ = ["DistEnv", "ShardedPrivateStep", "assign_owners", "init_distributed"]
