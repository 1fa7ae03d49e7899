"""Several gloo processes on this machine, for tests and benchmarks of the distributed step."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpllm.distributed.env import DistEnv


def run_on_ranks(world_size: int, fn, *args) -> list:
    """Run ``fn(env, *args)`` on ``world_size`` gloo processes; returns each rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world_size, tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world_size)]


def _worker(rank, world_size, tmp, fn, args):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        torch.save(fn(DistEnv(rank, world_size), *args), os.path.join(tmp, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
