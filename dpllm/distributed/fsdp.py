"""FSDP2 (torchrun) with no rank ever holding the whole model, except rank 0 while it loads.

    load    rank 0 loads the checkpoint; the other ranks build the same model on the meta device
    shard   each decoder layer is a unit, the root holds embeddings, final norm and head; rank 0's
            weights are then broadcast one tensor at a time, each rank keeping its own shard
    save    dpllm.distributed.saving streams the Hugging Face folder from the shards
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dpllm.distributed.env import DistEnv


def fully_shard_units(model: nn.Module) -> None:
    """Each decoder layer is a unit; the root holds embeddings, final norm and head."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)


def shard_from_rank0(model: nn.Module, env: DistEnv, device: torch.device) -> None:
    """Shard ``model`` (real on rank 0, on the meta device elsewhere) and fill every rank's shard
    with rank 0's weights; buffers (unsharded) are broadcast whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = {k: v for k, v in model.state_dict().items()} if env.is_main else {}
    fully_shard_units(model)
    if not env.is_main:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for buffer in model.buffers():  # non-persistent ones (rotary frequencies) are in no state dict
        if env.distributed:
            dist.broadcast(buffer, src=0)
