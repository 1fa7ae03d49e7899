"""bench/step_overhead.py: a whole run at the smoke size, and what its breakdown line measures."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench/step_overhead.py"


def _bench():
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gram_seconds_counts_only_sequence_by_sequence_products():
    bench = _bench()
    x, w = torch.randn(8, 32, 64), torch.randn(8, 32, 48)
    assert bench.gram_seconds(lambda: torch.bmm(x, x.transpose(1, 2)), 3, "cpu", seq=32) > 0
    assert bench.gram_seconds(lambda: torch.bmm(x.transpose(1, 2), w), 3, "cpu", seq=32) == 0  # per-sample gradients
    assert bench.gram_seconds(lambda: x.flatten(0, 1).mm(x[0].t()), 3, "cpu", seq=32) == 0


@pytest.mark.slow
def test_smoke_run_prints_ratios_and_breakdown():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--configs", "smoke", "--skip-opacus", "--steps", "4", "--memory-runs", "1"],
        cwd=REPO, check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    rows = {m[1]: [float(v) for v in m.groups()[1:]] for m in re.finditer(r"^(non-private|dpllm private)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)}
    assert set(rows) == {"non-private", "dpllm private"}, out
    (base_s, *_), (dp_s, dp_mb, time_ratio, mem_ratio) = rows["non-private"], rows["dpllm private"]
    assert base_s > 0 and dp_s > 0 and time_ratio > 0 and mem_ratio > 0 and dp_mb > 0
    line = re.search(r"extra (-?[\d.]+) ms per step: noise ([\d.]+) ms, Gram matrices \(profiled\) (-?[\d.]+) ms, .* ratio of ([\d.]+)$", out, re.M)
    assert line, out
    extra, noise, gram, floor = map(float, line.groups())
    # arithmetic between the printed numbers only: no timing is asserted (a fast machine prints 0.0 ms).
    # Printed roundings: step times to 0.05 ms, the milliseconds to 0.05 ms, the ratio to 0.005.
    assert extra == pytest.approx((dp_s - base_s) * 1e3, abs=0.16)
    base_ms = base_s * 1e3
    floor_error = 0.1 / base_ms + (noise + gram) * 0.05 / base_ms**2 + 0.006
    assert floor == pytest.approx((base_ms + noise + gram) / base_ms, abs=floor_error)
