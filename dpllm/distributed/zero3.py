"""DeepSpeed ZeRO-3 with no rank but rank 0 ever holding the whole model.

Rank 0 loads the checkpoint; the other ranks build the same model on the meta device and give it
uninitialised storage (pages never written cost no memory). ``deepspeed.zero.Init(module=...)``
then partitions the model one parameter at a time, broadcasting each from rank 0 first, so each
rank's storage for a parameter is written and freed in turn; ``deepspeed.initialize`` then finds
the model partitioned and skips broadcasting it whole. Buffers (never partitioned) are broadcast.
"""

from __future__ import annotations

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
