"""The offline search: what it returns meets the budget by the sound accountant and is never
noisier than plain Laplace; the launcher's file is what a run loads."""

import json
import subprocess
import sys

import pytest

from dpllm.config import load_config
from dpllm.privacy import lmo
from dpllm.privacy.lmo_search import search
from tests.launchers import REPO


def test_search_meets_the_budget_and_never_loses_to_laplace():
    result = search(3.0, 0.05, 50, 1e-5, candidates=12, rounds=1, seed=1)
    law = lmo.LMONoise(**result["noise"])
    assert lmo.epsilon(law, 1.0, 0.05, 50, 1e-5) <= 3.0 and result["epsilon"] <= 3.0
    assert result["noise_second_moment"] == pytest.approx(law.noise_second_moment())
    assert result["noise_second_moment"] <= result["laplace_second_moment"]
    laplace = lmo.calibrate(lmo.LMONoise.point_mass(1.0), 3.0, 1.0, 0.05, 50, 1e-5)
    assert result["laplace_second_moment"] == pytest.approx(2 / laplace.a4**2, rel=1e-9)


def test_the_launcher_writes_a_law_a_run_loads(tmp_path):
    out = tmp_path / "law.json"
    done = subprocess.run([sys.executable, "launch/lmo_search.py", "--epsilon", "8", "--sample-rate", "0.08", "--steps", "4",
                           "--delta", "2.5e-3", "--candidates", "4", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    config = load_config(REPO / "recipes/e2e/tiny_cpu.yaml", ["privacy.mechanism=lmo", f"lmo.mixture={out}"])
    assert config.lmo.law() == lmo.LMONoise(**json.loads(out.read_text())["noise"])


@pytest.mark.parametrize("name", [f"{task}_eps{eps}.json" for task in ("e2e_tiny", "sst2_minilm") for eps in (1, 3, 8)])
def test_cached_laws_meet_their_budgets(name):
    cached = json.loads((REPO / "recipes/lmo" / name).read_text())
    law = lmo.LMONoise(**cached["noise"])
    assert lmo.epsilon(law, 1.0, cached["sample_rate"], cached["steps"], cached["delta"]) <= cached["target_epsilon"]
