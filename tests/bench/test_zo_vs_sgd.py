"""bench/zo_vs_sgd.py end to end at the smoke size: both parts measure what they print (the
numbers themselves are the benchmark's, not the test's)."""

import json
import os
import sys

import pytest

from tests.launchers import TINY, run


@pytest.mark.slow
def test_smoke_run_measures_memory_and_quality(tmp_path):
    extra = [o for o in TINY if not o.startswith(("seed=", "privacy.noise_seed"))] + ["max_steps=3"]
    done = run(
        [sys.executable, "bench/zo_vs_sgd.py", "--model", "smoke", "--tasks", "e2e", "--epsilons", "8", "--probe-steps", "2",
         "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results"), "--extra", *extra],
        timeout=900, env=dict(os.environ),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results/results.json").read_text())
    (mem,) = results["memory"]
    assert 0 < mem["forward_mb"] and 0 < mem["dp_zo_mb"] and 0 < mem["dp_sgd_mb"] and mem["parameters"] > 0
    rows = results["quality"]
    assert [(r["task"], r["algorithm"]) for r in rows] == [("e2e", "dp_sgd"), ("e2e", "dp_zo")]
    assert all(r["epsilon_spent"] <= 8.0 and r["steps"] >= 1 and r["peak_rss_mb"] > 100 for r in rows)
    assert "| e2e | 8 | dp_zo |" in done.stdout
