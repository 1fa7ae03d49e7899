"""Saving a model whose parameters are partitioned across ranks (FSDP2, ZeRO-3), without
gathering it whole anywhere.

The Hugging Face folder is written one tensor at a time: every rank takes part in gathering it,
rank 0 writes it into the current safetensors shard (shards planned from shapes alone) and drops
it. LoRA adapters are merged into their base weights as they stream, and also saved alone
(``adapter/``, peft's form). Tied weights are stored once, as save_pretrained does.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from torch import Tensor, nn

from dpllm.distributed.env import DistEnv

SHARD_BYTES = 2 * 1024**3


def _full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective for FSDP2 shards and ZeRO-3 partitions)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor()
    if hasattr(t, "ds_id"):  # a ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.data.detach().clone()
    return t.detach()


def _lora_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Base-weight state-dict key -> (peft LoRA layer, adapter name), for merging as we stream."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            out[f"{name}.base_layer.weight"] = (module, module.active_adapters[0])
    return out


def _saved_name(key: str) -> str:
    """The key a merged, unwrapped Hugging Face model has for a (peft-wrapped) state-dict key."""
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def save_streaming(model: nn.Module, folder: Path, env: DistEnv, shard_bytes: int = SHARD_BYTES) -> None:
    """Write ``model`` as a Hugging Face folder (config, safetensors shards and their index) from
    its FSDP2 shards or ZeRO-3 partitions; every rank must call it. Rank 0 holds one tensor at a
    time: each file's header is written from the shapes first, then each tensor's bytes as it
    is gathered."""
    state = model.state_dict(keep_vars=True)
    lora = _lora_layers(model)
    entries, seen = [], set()
    for key, t in state.items():
        if "lora_" in key or id(t) in seen:
            continue
        seen.add(id(t))
        entries.append((key, t))
    # Shards planned from shapes alone, so every file name is known before anything is gathered.
    plan, size = [[]], 0
    for key, t in entries:
        nbytes = math.prod(_shape(t)) * t.element_size()
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((key, t))
        size += nbytes
    files = ["model.safetensors"] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for file, shard in zip(files, plan):
        layout = [(_saved_name(key), _shape(t), t.dtype) for key, t in shard]
        writer = _SafetensorsWriter(folder / file, layout) if env.is_main else None
        for key, t in shard:
            value = _full(t)
            if key in lora:
                layer, adapter = lora[key]
                a, b = _full(layer.lora_A[adapter].weight), _full(layer.lora_B[adapter].weight)
                delta = (b.double() @ a.double()) * layer.scaling[adapter]
                value = (value.double() + delta).to(value.dtype)
            if writer is not None:
                writer.write(value)
            del value
        if writer is not None:
            writer.close()
            weight_map.update({name: file for name, _, _ in layout})
            total += writer.size
    if env.is_main:
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.save_pretrained(folder)
        if getattr(base, "generation_config", None) is not None and base.can_generate():
            base.generation_config.save_pretrained(folder)
    if lora:
        save_adapter(model, folder / "adapter", env)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))  # ZeRO-3 keeps the full shape apart


_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class _SafetensorsWriter:
    """A safetensors file written in order, one tensor at a time: the header (names, dtypes,
    shapes, byte ranges) is known from the layout, so no tensor has to wait for the others."""

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        header, offset = {}, 0
        self._expected = []
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, tuple(shape), dtype))
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.size = offset
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, value: Tensor) -> None:
        name, shape, dtype = self._expected.pop(0)
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise RuntimeError(f"{name}: gathered {tuple(value.shape)} {value.dtype}, planned {shape} {dtype}")
        self._file.write(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        if self._expected:
            raise RuntimeError(f"{len(self._expected)} planned tensors were not written")
        self._file.close()


def save_adapter(model: nn.Module, folder: Path, env: DistEnv) -> None:
    """The LoRA adapters alone, in peft's form (adapter_config.json, adapter_model.safetensors)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    full = {key: _full(t) for key, t in model.state_dict(keep_vars=True).items() if "lora_" in key}
    if env.is_main:
        tensors = get_peft_model_state_dict(model, state_dict=full, save_embedding_layers=False)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        model.peft_config[model.active_adapter].save_pretrained(folder)
