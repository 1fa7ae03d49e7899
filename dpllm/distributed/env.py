"""The process group of a run: torchrun and the DeepSpeed launcher both set RANK/WORLD_SIZE/LOCAL_RANK."""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import psutil
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def broadcast_int(self, value: int | None) -> int:
        """Rank 0's ``value`` on every rank (seeds are drawn on rank 0 only)."""
        if not self.distributed:
            return int(value)
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return int(box[0])

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few scalars (step statistics)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def max_int(self, value: int) -> int:
        """The largest ``value`` over ranks."""
        if not self.distributed:
            return int(value)
        t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


LAUNCHERS = ("torchrun", "torch.distributed.run", "torch.distributed.launch", "deepspeed")


def _launchers() -> list[psutil.Process]:
    """The ancestors that launched this worker: torchrun's agent, or DeepSpeed's runner and its
    per-node launch process (else the parent alone)."""
    me = psutil.Process()
    chain, p = [], me.parent()
    while p is not None and p.pid > 1:
        try:
            if not any(marker in " ".join(p.cmdline()) for marker in LAUNCHERS):
                break
        except psutil.Error:
            break
        chain.append(p)
        p = p.parent()
    return chain or [me.parent()]


def exit_with_launcher(interval: float = 0.5) -> None:
    """End this worker soon after a process that launched it dies. torchrun and the DeepSpeed
    launcher start workers in sessions of their own, so killing the launcher would leave them
    running, still writing checkpoints into a folder that a resumed run now owns."""
    launchers = _launchers()

    def watch() -> None:
        while all(p.is_running() for p in launchers):
            time.sleep(interval)
        print(f"dpllm: the launcher is gone; worker {os.getpid()} exits", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="dpllm-launcher-watch", daemon=True).start()


def _skip_shared_memory_all_reduce() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce when it starts, which only its
    inference kernels call. Training uses gloo, so skip it: the compile takes minutes on a fresh
    machine (and a rank killed during it leaves a lock that blocks every later start), and each
    run leaves 66 MiB per rank of buffers in /dev/shm that nothing removes."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(engine: str) -> DistEnv:
    """Join the process group the launcher describes (gloo on CPU, NCCL on GPUs); one process if none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and engine == "single":
        return DistEnv()
    if "LOCAL_RANK" in os.environ:  # started by torchrun or the DeepSpeed launcher
        exit_with_launcher()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if engine == "deepspeed":
            import deepspeed

            if not torch.cuda.is_available():
                _skip_shared_memory_all_reduce()
            deepspeed.init_distributed(dist_backend=backend)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group(backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
