"""bench/sample_efficiency.py: its table arithmetic on hand-worked curves, and a whole run at the smoke size."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpllm.training.metrics import read_logs

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench/sample_efficiency.py"


def _bench():
    spec = importlib.util.spec_from_file_location("sample_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_mean_curve_and_steps_to_levels():
    bench = _bench()
    runs = [{"eval": {0: 4.0, 3: 3.6, 6: 3.0, 9: 3.1}}, {"eval": {0: 4.0, 3: 3.4, 6: 3.16, 9: 2.9, 12: 1.0}}]
    curve = bench.mean_curve(runs, "eval")
    assert curve == pytest.approx({0: 4.0, 3: 3.5, 6: 3.08, 9: 3.0})  # step 12: only one run has it
    # a gain of 1.0 from 4.0: 90% of it is a loss <= 3.1 (step 6), 95% a loss <= 3.05 (step 9)
    assert bench.steps_to(curve, 4.0 - 0.9) == 6
    assert bench.steps_to(curve, 4.0 - 0.95) == 9
    assert bench.steps_to(curve, 2.5) is None


@pytest.mark.slow
def test_smoke_run_compares_seed_matched_variants(tmp_path):
    out = tmp_path / "sample_efficiency"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "smoke", "--epsilons", "8", "--out", str(out)],
        cwd=REPO, check=True, capture_output=True, text=True, timeout=900,
    )
    table = json.loads((out / "results.json").read_text())
    assert [(r["epsilon"], r["variant"]) for r in table] == [(8.0, "baseline"), (8.0, "denoised")]
    runs = {}
    for row in table:
        metrics = read_logs(out / "runs" / f"eps8_{row['variant']}_seed0")
        runs[row["variant"]] = metrics
        evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
        assert sorted(evals) == [0, 2, 4]
        assert row["final_eval_loss"] == pytest.approx(evals[4])  # one seed: the mean is that run's loss
        assert not any("scores" in m for m in metrics)  # the benchmark compares eval loss; no beam search
        assert any("denoised_fraction" in m for m in metrics) == (row["variant"] == "denoised")
    base = {m["step"]: m["eval_loss"] for m in runs["baseline"] if "eval_loss" in m}
    gain = base[0] - base[4]
    expected_90 = next((s for s in sorted(base) if base[s] <= base[0] - 0.9 * gain), None)
    assert table[0]["steps_to_90"] == expected_90
    # Same seed, same public model: both variants start from the same eval loss and the same plan.
    plan = ("noise_multiplier", "sample_rate", "eval_loss")
    assert [runs["baseline"][0][k] for k in plan] == [runs["denoised"][0][k] for k in plan]
    assert "mean_cos_gain" in table[1] and "mean_cos_gain" not in table[0]
    for plot in ("eval_loss.png", "improvement.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
