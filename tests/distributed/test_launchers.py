"""The README's multi-process launch commands, 1 process vs 2, on CPU with gloo."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launchers import RECIPE, REPO, TINY, command, env


def _launch(kind: str, out: Path, extra: list[str]) -> dict:
    args = ["--recipe", RECIPE, *TINY, "max_steps=3", f"output_dir={out}", *extra]
    done = subprocess.run(command(kind, args), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"params": load_file(out / "final/model.safetensors"), "rows": rows, "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("denoise", [False, True], ids=["plain", "denoised"])
def test_two_processes_match_one(tmp_path, denoise):
    extra = ["denoise.enabled=true"] if denoise else []
    kinds = ("deepspeed", "fsdp", "ddp")
    runs = {kind: _launch(kind, tmp_path / kind, extra) for kind in ("single", *kinds)}
    single = runs["single"]
    for kind in kinds:
        run = runs[kind]
        assert run["summary"]["world_size"] == 2 and single["summary"]["world_size"] == 1
        assert run["summary"]["epsilon"] == single["summary"]["epsilon"]
        for name, value in single["params"].items():
            torch.testing.assert_close(run["params"][name], value, rtol=0, atol=1e-5, msg=f"{kind}: {name}")
        steps = [r for r in run["rows"] if "loss" in r]
        assert [r["batch_size"] for r in steps] == [r["batch_size"] for r in single["rows"] if "loss" in r]
    moved = max(float((single["params"][n] - load_file(REPO / "assets/models/stories260K/model.safetensors")[n]).abs().max()) for n in single["params"])
    assert moved > 1e-3  # the runs did train
    if denoise:
        expected = [r["denoised_fraction"] for r in single["rows"] if "denoised_fraction" in r]
        assert max(expected) > 0  # some matrix was denoised, so the sharded path did real work
        for kind in kinds:
            assert [r["denoised_fraction"] for r in runs[kind]["rows"] if "denoised_fraction" in r] == expected
