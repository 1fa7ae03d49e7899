"""Several gloo processes on this machine, for tests and benchmarks of the distributed step."""

import os
import random
import socket
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


def free_port() -> int:
    """A port for a launcher's rendezvous that no process on this machine holds now, taken below
    the kernel's ephemeral range (32768 and up on Linux): a port the kernel picked could be handed
    out again as the local end of another run's connection before the launcher binds it, which
    happens when tests or benchmarks launch in parallel. Each pytest-xdist worker draws from a
    range of its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    low = 20000 + 1000 * (int(worker) % 12 if worker.isdigit() else 0)
    for port in random.sample(range(low, low + 1000), 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {low + 1000})")
