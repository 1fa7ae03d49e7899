"""bench/lmo_claims.py end to end at the smoke size: both parts measure what they print."""

import json
import math
import os
import sys

import pytest

from tests.launchers import TINY, run


def test_the_papers_method_reports_less_than_the_sound_epsilon_of_the_same_mechanism():
    from bench.lmo_claims import PAPER, paper_epsilon
    from dpllm.privacy import lmo
    from dpllm.privacy.accounting import compute_epsilon

    law = lmo.LMONoise.point_mass(2.0)
    reported, sigma, eps1 = paper_epsilon(law, PAPER["sample_rate"], PAPER["steps"], PAPER["delta"])
    # the one-step formula, by hand at order 10: log[(a M(a-1) + (a-1) M(-a)) / (2a-1)] / (a-1), M(t) = e^{2t}
    a = 10
    by_hand = math.log((a * math.exp(2 * (a - 1)) + (a - 1) * math.exp(-2 * a)) / (2 * a - 1)) / (a - 1)
    assert eps1 <= by_hand + math.log(1 / PAPER["delta"]) / (a - 1)
    assert sigma == pytest.approx(math.sqrt(2 * math.log(1.25 / PAPER["delta"])) / eps1)
    assert reported == pytest.approx(compute_epsilon(sigma, PAPER["sample_rate"], PAPER["steps"], PAPER["delta"], "rdp"))
    assert lmo.epsilon(law, 1.0, PAPER["sample_rate"], PAPER["steps"], PAPER["delta"]) > reported


@pytest.mark.slow
def test_smoke_run_measures_accounting_and_quality(tmp_path):
    extra = [o for o in TINY if not o.startswith(("seed=", "privacy.noise_seed"))] + ["max_steps=2"]
    done = run(
        [sys.executable, "bench/lmo_claims.py", "--claims", "0.3", "--tasks", "e2e", "--epsilons", "8",
         "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results"), "--extra", *extra],
        timeout=900, env=dict(os.environ),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results/results.json").read_text())
    (row,) = results["accounting"]
    assert row["paper_epsilon"] == pytest.approx(0.3, rel=1e-3) and row["sound_epsilon_l1_clip"] > row["paper_epsilon"]
    assert row["sound_epsilon_l2_clip"] > row["sound_epsilon_l1_clip"]
    rows = results["quality"]
    assert [(r["mechanism"], r["clip"]) for r in rows] == [("gaussian", "l2"), ("lmo", "l1")]
    assert all(r["epsilon_spent"] <= 8.0 and r["steps"] == 2 for r in rows)
    assert "| e2e | 8 | lmo | l1 |" in done.stdout
