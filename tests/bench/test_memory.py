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


@pytest.mark.slow
def test_smoke_run_measures_the_sequence_length_axis(tmp_path):
    """With and without checkpointing at one T: both measured, auto's clipping mode recorded, and
    the two runs (same seeds) end at the same parameters."""
    done = run(
        [sys.executable, "bench/memory.py", "--model", "smoke", "--engines", "single", "--worlds", "1", "--lengths", "96",
         "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results")],
        timeout=900, env=dict(os.environ),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (row,) = json.loads((tmp_path / "results/lengths.json").read_text())["rows"]
    assert (row["T"], row["engine"], row["world"], row["clipping_with"]) == (96, "single", 1, "two_pass")
    assert all(isinstance(row[k], (int, float)) for k in ("without_mb", "with_mb", "ratio"))  # the smoke model's are noise
    assert row["max_param_diff"] <= 1e-5
    data = (tmp_path / "out/data/train_T96.csv").read_text().splitlines()
    assert len(data) > 100  # the embedded rows, each reference repeated past 96 tokens
    assert "| 96 | single | 1 |" in done.stdout


def test_largest_length_follows_the_line_through_the_two_largest_measured_t():
    sys.path.insert(0, "bench")
    from memory import largest_lengths

    rows = [
        {"T": 256, "engine": "fsdp", "world": 2, "without_mb": 900, "with_mb": 900},  # flat: the fixed state's peak
        {"T": 1024, "engine": "fsdp", "world": 2, "without_mb": 1375, "with_mb": 1011},
        {"T": 4096, "engine": "fsdp", "world": 2, "without_mb": 3782, "with_mb": 2161},
        {"T": 1024, "engine": "single", "world": 1, "without_mb": 1940, "with_mb": 1695},
        {"T": 1024, "engine": "single", "world": 1, "optim": "sgd", "without_mb": 1100, "with_mb": 900},
        {"T": 4096, "engine": "single", "world": 1, "optim": "sgd", "without_mb": 3100, "with_mb": 1900},
        {"T": 8192, "engine": "single", "world": 1, "optim": "sgd", "model": "other", "without_mb": 9000, "with_mb": 9000},
    ]
    (fsdp, single, single_sgd, other) = largest_lengths(rows, 3000)
    assert (other["model"], other["measured"]) == ("other", "8192")  # another model's rows make no line with these
    # rows without an optimizer are AdamW's; SGD's rows make a line of their own (another model's apart):
    # without 4096 + (3000 - 3100) / (2000 / 3072) = 3942.4; with 4096 + 1100 / (1000 / 3072) = 7475.2
    assert (single["optim"], single_sgd["optim"]) == ("adamw", "sgd")
    assert (single_sgd["without"], single_sgd["with"]) == ("3942", "7475 (extrapolated)")
    # by hand, rounded down: without 4096 + (3000 - 3782) / (2407 / 3072) = 3097.95; with 4096 + 839 / (1150 / 3072) = 6337.2
    assert (fsdp["measured"], fsdp["without"], fsdp["with"]) == ("256, 1024, 4096", "3097", "6337 (extrapolated)")
    assert single["with"] == "needs two T"
    (fsdp, _, _, _) = largest_lengths(rows, 1000)
    assert fsdp["without"] == "below the measured range"
