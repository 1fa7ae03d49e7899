"""The streamed safetensors writer, read back by the safetensors library itself."""

import pytest
import torch
from safetensors.torch import load_file

from dpllm.distributed.saving import _SafetensorsWriter


def test_a_file_written_one_tensor_at_a_time_is_what_safetensors_reads(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(11, 5, generator=g),
        "model.norm.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "steps": torch.arange(3),
    }
    writer = _SafetensorsWriter(tmp_path / "m.safetensors", [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
    for value in tensors.values():
        writer.write(value.t().contiguous().t() if value.dim() == 2 else value)
    writer.close()
    read = load_file(tmp_path / "m.safetensors")
    assert set(read) == set(tensors)
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype and torch.equal(read[name], value), name

    writer = _SafetensorsWriter(tmp_path / "bad.safetensors", [("w", (2, 3), torch.float32)])
    with pytest.raises(RuntimeError, match=r"w: gathered \(3, 2\)"):
        writer.write(torch.zeros(3, 2))
    writer = _SafetensorsWriter(tmp_path / "short.safetensors", [("w", (2, 3), torch.float32)])
    with pytest.raises(RuntimeError, match="1 planned tensors were not written"):
        writer.close()
