"""FSDP2 (torchrun) with no rank ever holding the whole model, except rank 0 while it loads.

    load    rank 0 loads the checkpoint, each tensor in its own memory; the other ranks build the
            same model on the meta device
    shard   unit by unit (each decoder layer, untied input and output embeddings, then the root
            with what is left), rank 0 broadcasts the unit's tensors, every rank shards them and
            keeps its own shard, and the unit's full tensors are freed: rank 0's model shrinks
            as the shards grow, the other ranks hold one full unit at a time
    save    dpllm.distributed.saving streams the Hugging Face folder from the shards
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dpllm.distributed.env import DistEnv


def shard_from_rank0(model: nn.Module, env: DistEnv, device: torch.device) -> None:
    """Shard ``model`` (real on rank 0, on the meta device elsewhere), every rank's shards holding
    rank 0's weights. The caller must hold no reference to the full parameters (they are freed
    unit by unit). Buffers (unsharded; non-persistent ones such as rotary frequencies are in no
    checkpoint) are broadcast whole."""
    from torch.distributed.fsdp import fully_shard

    _broadcast_buffers(model, env, device)
    for unit in [*_units(model), model]:
        _materialise_from_rank0(unit, env, device)
        fully_shard(unit)


def _units(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer; untied input and output embeddings too (each is gathered only while
    it is used, not for the whole forward and backward as the root is)."""
    units = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    if all(isinstance(m, nn.Module) for m in embeddings) and embeddings[0].weight is not embeddings[1].weight:
        units += embeddings
    return units


def _materialise_from_rank0(unit: nn.Module, env: DistEnv, device: torch.device) -> None:
    """Every parameter of ``unit`` not sharded yet, as rank 0's full tensor on ``device`` on
    every rank; a parameter used by several modules (tied weights) stays one parameter."""
    from torch.distributed.tensor import DTensor

    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for module in unit.modules():
        for name, p in module._parameters.items():
            if p is not None and not isinstance(p, DTensor):
                owners.setdefault(id(p), []).append((module, name))
                params[id(p)] = p
    for key, p in params.items():
        data = p.detach().to(device) if env.is_main else torch.empty(p.shape, dtype=p.dtype, device=device)
        if env.distributed:
            dist.broadcast(data, src=0)
        full = nn.Parameter(data, requires_grad=p.requires_grad)
        for module, name in owners[key]:
            module._parameters[name] = full


def _broadcast_buffers(model: nn.Module, env: DistEnv, device: torch.device) -> None:
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is None:
                continue
            data = b.to(device) if env.is_main else torch.empty(b.shape, dtype=b.dtype, device=device)
            if env.distributed:
                dist.broadcast(data, src=0)
            module._buffers[name] = data
