"""The process group of a run: torchrun and the DeepSpeed launcher both set RANK/WORLD_SIZE/LOCAL_RANK."""

from __future__ import annotations

import os
from dataclasses import dataclass

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

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(engine: str) -> DistEnv:
    """Join the process group the launcher describes (gloo on CPU, NCCL on GPUs); one process if none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and engine == "single":
        return DistEnv()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if engine == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group(backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
