"""DeepSpeed ZeRO-3 with no rank but rank 0 ever holding the whole model.

Rank 0 loads the checkpoint; the other ranks build the same model on the meta device and give it
uninitialised storage (pages never written cost no memory). ``deepspeed.zero.Init(module=...)``
then partitions the model one parameter at a time, broadcasting each from rank 0 first, so each
rank's storage for a parameter is written and freed in turn; ``deepspeed.initialize`` then finds
the model partitioned and skips broadcasting it whole. Buffers (never partitioned) are broadcast.

ZeRO-3 fetches a module's partitions before its backward and releases them after, counting the
backwards it expects from the forwards that ran; a second backward over the same graph (the
clipper's two_pass) finds the counts spent and would run on released weights.
:func:`backward_hook_replay` restores the counts for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from dpllm.distributed.env import DistEnv


def partition_from_rank0(model: nn.Module, ds_config: dict, env: DistEnv) -> None:
    """Partition ``model`` (loaded on rank 0, uninitialised elsewhere) with rank 0's weights."""
    import deepspeed

    if not env.is_main:
        model.to_empty(device="cpu")
        model.tie_weights()  # to_empty unties shared weights; every rank must list the same parameters
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float16 if ds_config.get("fp16", {}).get("enabled") else None
    if dtype is not None:  # ZeRO-3 expects a partitioned model in the dtype it trains in
        for p in model.parameters():
            p.data = p.data.to(dtype)
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    for buffer in model.buffers():  # non-persistent ones (rotary frequencies) are in no checkpoint
        if env.distributed:
            dist.broadcast(buffer, src=0)


# DeepSpeed's per-module counters: backwards still to fetch for, and gradients still to arrive before release
_BACKWARD_COUNTERS = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")


def backward_hook_replay(model: nn.Module) -> Callable[[], Callable[[], None]]:
    """For the clipper's ``replay_backward_hooks``: snapshot ZeRO-3's counters once the forward has
    run; the returned call restores them before the second backward, which then fetches and
    releases each module's partitions as the first did."""

    def snapshot() -> Callable[[], None]:
        counts = [(m, name, m.__dict__[name]) for m in model.modules() for name in _BACKWARD_COUNTERS if name in m.__dict__]

        def restore() -> None:
            for module, name, value in counts:
                setattr(module, name, value)

        return restore

    return snapshot


def partitions(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's piece of every partitioned parameter: what a run without an optimizer (dp_zo,
    which updates the pieces in place) keeps of its weights."""
    return {name: p.ds_tensor.detach().clone() for name, p in model.named_parameters() if hasattr(p, "ds_tensor")}


def load_partitions(model: nn.Module, pieces: dict[str, torch.Tensor]) -> None:
    """Write a checkpoint's pieces (of the same world size) back into this rank's partitions."""
    mine = {name: p for name, p in model.named_parameters() if hasattr(p, "ds_tensor")}
    if set(mine) != set(pieces):
        raise ValueError(f"the checkpoint's ZeRO-3 partitions name other parameters: {sorted(set(mine) ^ set(pieces))[:5]}")
    with torch.no_grad():
        for name, p in mine.items():
            p.ds_tensor.copy_(pieces[name])
