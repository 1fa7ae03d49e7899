"""FSDP2 (torchrun) with no rank ever holding the whole model, except rank 0 while it loads.

    load    rank 0 loads the checkpoint, each tensor in its own memory; the other ranks build the
            same model on the meta device
    shard   unit by unit (untied input and output embeddings, each decoder layer, then the root
            with what is left), rank 0 broadcasts the unit's tensors, every rank shards them and
            keeps its own shard, and the unit's full tensors are freed: rank 0's model shrinks
            as the shards grow, the other ranks hold one full unit at a time. Untied embeddings
            are row-sharded (dpllm.distributed.row_sharded: gathered in blocks, never whole);
            the decoder layers and the root are FSDP2 units
    save    dpllm.distributed.saving streams the Hugging Face folder from the shards

precision=bf16-mixed shards with FSDP2's MixedPrecisionPolicy: the fp32 shards (the master
weights the optimizer updates) are gathered as bf16, which halves the gathered unit and its
traffic, and each unit's floating inputs are cast to bf16. The private step reads no gradient
FSDP2 reduces (the clipper forms fp32 sums from the layers' inputs and output gradients and
hands them to the shards itself); the policy's reduce dtype is fp32 all the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dpllm.distributed.env import DistEnv
from dpllm.distributed.row_sharded import shard_rows


def shard_from_rank0(model: nn.Module, env: DistEnv, device: torch.device, *, bf16_gather: bool = False) -> None:
    """Shard ``model`` (real on rank 0, on the meta device elsewhere), every rank's shards holding
    rank 0's weights. The caller must hold no reference to the full parameters (they are freed
    unit by unit). Buffers (unsharded; non-persistent ones such as rotary frequencies are in no
    checkpoint) are broadcast whole. ``bf16_gather``: precision=bf16-mixed's policy (above)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_gather else {}
    policy = MixedPrecisionPolicy(**bf16)
    mesh = init_device_mesh(device.type, (env.world_size,))
    _broadcast_buffers(model, env, device)
    row_sharded = _untied_embeddings(model)
    for module in row_sharded:
        _materialise_from_rank0(module, env, device)
        shard_rows(module, mesh, bf16=bf16_gather)
    ignored = {m.weight for m in row_sharded}
    for unit in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")] + [model]:
        _materialise_from_rank0(unit, env, device)
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=ignored if unit is model else None)


def _untied_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embedding and output head when they are plain, untied modules (a tied pair
    stays in the root unit, gathered for the whole forward and backward)."""
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    plain = type(embeddings[0]) is nn.Embedding and type(embeddings[1]) is nn.Linear and embeddings[1].bias is None
    return embeddings if plain and embeddings[0].weight is not embeddings[1].weight else []


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
