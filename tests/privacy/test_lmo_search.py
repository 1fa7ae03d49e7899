"""The offline search: what it returns meets the budget by the sound accountant and is never
noisier than plain Laplace; the launcher's file is what a run loads."""

import json
import math
import subprocess
import sys

import pytest

from dpllm.config import load_config
from dpllm.privacy import lmo
from dpllm.privacy.lmo_search import search
from tests.launchers import REPO


def test_search_meets_the_budget_and_never_loses_to_laplace():
    result = search(3.0, 0.05, 50, 1e-5, candidates=12, rounds=1, seed=1, objective="second_moment")
    law = lmo.LMONoise(**result["noise"])
    assert lmo.epsilon(law, 1.0, 0.05, 50, 1e-5) <= 3.0 and result["epsilon"] <= 3.0
    assert result["noise_second_moment"] == pytest.approx(law.noise_second_moment())
    assert result["noise_second_moment"] <= result["laplace_second_moment"]
    laplace = lmo.calibrate(lmo.LMONoise.point_mass(1.0), 3.0, 1.0, 0.05, 50, 1e-5)
    assert result["laplace_second_moment"] == pytest.approx(2 / laplace.a4**2, rel=1e-9)


def test_usefulness_is_the_chance_the_noise_is_within_gamma():
    """Hand-worked for a point mass (1 - e^{-gamma u}), and Monte Carlo for a mixture: the share
    of Laplace(0, 1/U) draws within gamma."""
    import torch

    assert lmo.LMONoise.point_mass(2.0).usefulness(0.9) == pytest.approx(1 - math.exp(-1.8), rel=1e-12)
    law = lmo.LMONoise(a1=0.4, k=2.5, a3=0.3, lam=2.0, a4=0.3, lo=0.5, hi=1.5)
    g = torch.Generator().manual_seed(0)
    u = law.sample((400_000,), g, dtype=torch.float64)
    z = torch.distributions.Laplace(torch.zeros_like(u), 1 / u).sample()
    share = float((z.abs() <= 0.9).double().mean())
    assert abs(share - law.usefulness(0.9)) < 4 * math.sqrt(share * (1 - share) / u.numel())


def test_the_paper_s_objective_is_searched_and_never_loses_to_laplace():
    result = search(3.0, 0.05, 50, 1e-5, candidates=12, rounds=1, seed=1, objective="usefulness", gamma=0.9)
    law = lmo.LMONoise(**result["noise"])
    assert result["objective"] == "usefulness" and lmo.epsilon(law, 1.0, 0.05, 50, 1e-5) <= 3.0
    assert result["usefulness"] == pytest.approx(law.usefulness(0.9)) and result["usefulness"] >= result["laplace_usefulness"]
    laplace = lmo.calibrate(lmo.LMONoise.point_mass(1.0), 3.0, 1.0, 0.05, 50, 1e-5)
    assert result["laplace_usefulness"] == pytest.approx(1 - math.exp(-0.9 * laplace.a4 * laplace.lo), rel=1e-9)
    with pytest.raises(ValueError, match="objective must be one of"):
        search(3.0, 0.05, 50, 1e-5, objective="variance")


def test_the_launcher_writes_a_law_a_run_loads(tmp_path):
    out = tmp_path / "law.json"
    done = subprocess.run([sys.executable, "launch/lmo_search.py", "--epsilon", "8", "--sample-rate", "0.08", "--steps", "4",
                           "--delta", "2.5e-3", "--candidates", "4", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    config = load_config(REPO / "recipes/e2e/tiny_cpu.yaml", ["privacy.mechanism=lmo", f"lmo.mixture={out}"])
    assert config.lmo.law() == lmo.LMONoise(**json.loads(out.read_text())["noise"])


@pytest.mark.parametrize(
    "name", [f"{task}_eps{eps}{kind}.json" for task in ("e2e_tiny", "sst2_minilm") for eps in (1, 3, 8) for kind in ("", "_usefulness")]
)
def test_cached_laws_meet_their_budgets(name):
    cached = json.loads((REPO / "recipes/lmo" / name).read_text())
    law = lmo.LMONoise(**cached["noise"])
    assert lmo.epsilon(law, 1.0, cached["sample_rate"], cached["steps"], cached["delta"]) <= cached["target_epsilon"]
