"""bench/memory.py end to end at the smoke size: every engine and world size asked for is launched
and measured (the numbers themselves are the benchmark's, not the test's)."""

import json
import os
import sys

import pytest

from tests.launchers import run


@pytest.mark.slow
def test_smoke_run_measures_each_world_size(tmp_path):
    done = run(
        [sys.executable, "bench/memory.py", "--model", "smoke", "--engines", "fsdp", "--worlds", "1", "2",
         "--optims", "sgd", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results")],
        timeout=900, env=dict(os.environ),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "results/results.json").read_text())["rows"]
    assert [(r["engine"], r["optim"], r["world"]) for r in rows] == [("fsdp", "sgd", 1), ("fsdp", "sgd", 2)]
    for r in rows:
        assert r["measure"] == "rss_mb" and r["peak_mb"] > 100 and r["baseline_mb"] > 100
        assert 0 < r["setup_peak_mb"] <= r["peak_mb"]  # the training phase was reached and sampled
        assert r["training_bytes_per_param"] is not None
    assert "| fsdp | sgd | 2 |" in done.stdout
