"""LMO-DP's accounting against dp-accounting, numerical Rényi divergences and Monte Carlo
privacy losses; its sampler; its stateful accountant."""

import logging
import math

import numpy as np
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import integrate

from dpllm.privacy import lmo
from dpllm.privacy.accountant import LMOAccountant, PrivacyAccountant
from dpllm.privacy.lmo import LaplaceMixtureNoise, LMONoise

GAMMA = LMONoise(a1=0.1, k=3.0, theta=1.0, a3=0.0, a4=0.0)  # U = 0.1 Gamma(3, 1): densities in closed form


def gamma_density(law: LMONoise, y: np.ndarray, shift: float) -> np.ndarray:
    """The density of Laplace(shift, 1/U) with U ~ Gamma(k, scale a1 theta): E[U/2 e^{-U|y-s|}]."""
    beta = law.a1 * law.theta
    t = np.abs(y - shift)
    return law.k * beta / 2 * (1 + beta * t) ** (-(law.k + 1))


def renyi(log_p, log_q, alpha: float) -> float:
    """(alpha - 1) D_alpha(p || q) by quadrature, log-densities as functions of y."""
    f = lambda y: math.exp(alpha * log_p(y) + (1 - alpha) * log_q(y))  # noqa: E731
    pieces = [(-np.inf, 0.0), (0.0, 1.0), (1.0, np.inf)]  # the kinks of both densities (shifts 0 and <= 1)
    return math.log(sum(integrate.quad(f, a, b, limit=400, epsabs=0, epsrel=1e-10)[0] for a, b in pieces))


@pytest.mark.parametrize("q", [1e-3, 1e-2, 0.1, 1.0])
@pytest.mark.parametrize("steps", [1, 30, 1000])
@pytest.mark.parametrize("u", [0.5, 2.0, 8.0])
def test_point_mass_epsilon_is_never_below_dp_accountings_laplace_pld(q, steps, u):
    logging.getLogger().setLevel(logging.ERROR)
    delta = 1e-5
    ours = lmo.epsilon(LMONoise.point_mass(u), 1.0, q, steps, delta)
    pld = pld_lib.from_laplace_mechanism(1 / u, sensitivity=1.0, sampling_prob=q, value_discretization_interval=1e-4)
    theirs = pld.self_compose(steps).get_epsilon_for_delta(delta)
    assert ours >= theirs
    if q == 1 and steps == 1:  # pure Laplace: eps = u, approached from above by the orders
        assert ours == pytest.approx(u, rel=0.05)


@pytest.mark.parametrize("alpha", [2, 5, 20])
@pytest.mark.parametrize("u", [0.3, 1.5])
def test_point_mass_moment_is_the_laplace_renyi_divergence(alpha, u):
    law = LMONoise.point_mass(u)
    p = lambda y: math.log(u / 2) - u * abs(y)  # noqa: E731
    q = lambda y: math.log(u / 2) - u * abs(y - 1.0)  # noqa: E731
    assert lmo.base_log_moment(law, 1.0, np.array([alpha]))[0] == pytest.approx(renyi(p, q, alpha), rel=1e-6)


@pytest.mark.parametrize("alpha", [2, 4, 8])
def test_random_scale_moment_bounds_the_true_divergence_and_the_worst_case_is_one_coordinate(alpha):
    """Joint convexity: the bound is above the mixture's real divergence; superadditivity: a
    shift split over two coordinates spends no more than the whole shift on one."""
    bound = lmo.base_log_moment(GAMMA, 1.0, np.array([alpha]))[0]

    def one(shift: float) -> float:
        return renyi(lambda y: math.log(gamma_density(GAMMA, y, 0.0)), lambda y: math.log(gamma_density(GAMMA, y, shift)), alpha)

    whole = one(1.0)
    assert whole <= bound and whole > 0.2 * bound  # sound, and not vacuous
    for split in (0.2, 0.5):
        assert one(split) + one(1.0 - split) <= whole + 1e-9
        # the per-coordinate bound itself is superadditive (the proof's step 3)
        parts = lmo.base_log_moment(GAMMA, split, np.array([alpha]))[0] + lmo.base_log_moment(GAMMA, 1 - split, np.array([alpha]))[0]
        assert parts <= bound + 1e-12


def uniform_density(lo: float, hi: float, y: np.ndarray, shift: float) -> np.ndarray:
    """The density of Laplace(shift, 1/U) with U ~ Uniform(lo, hi): E[U/2 e^{-U|y-s|}]."""
    t = np.maximum(np.abs(y - shift), 1e-12)
    antiderivative = lambda u: -np.exp(-u * t) * (u * t + 1) / t**2  # noqa: E731  (of u e^{-ut})
    return (antiderivative(hi) - antiderivative(lo)) / (2 * (hi - lo))


POWER = {"add": 2, "remove": 4}


@pytest.mark.parametrize("direction", ["add", "remove"])
def test_monte_carlo_privacy_loss_tail_of_one_subsampled_step_lies_under_the_bound(direction):
    """The worst-case pair of one Poisson-subsampled step (the row present with probability q,
    its L1 budget on one coordinate), U ~ Uniform(0.5, 1.5): the privacy loss's tail, estimated
    from 400k draws on a grid of thresholds, against the tail bound min_a exp((a-1)(eps_a - t))
    the RDP bound implies. The same check fails with the bound divided by 2 (add) or 4 (remove, where
    the bound is looser): it has power."""
    lo, hi, q, n = 0.5, 1.5, 0.5, 400_000
    law = LMONoise(a1=0.0, a3=0.0, a4=1.0, lo=lo, hi=hi)
    rng = np.random.default_rng(0)
    laplace = rng.laplace(0.0, 1.0, size=n) / rng.uniform(lo, hi, size=n)
    log_p0 = lambda y: np.log(uniform_density(lo, hi, y, 0.0))  # noqa: E731
    log_mixed = lambda y: np.log((1 - q) * uniform_density(lo, hi, y, 0.0) + q * uniform_density(lo, hi, y, 1.0))  # noqa: E731
    if direction == "add":  # the output of the dataset with the row; loss log(mixed / p0)
        y = laplace + np.where(rng.random(n) < q, 1.0, 0.0)
        loss = log_mixed(y) - log_p0(y)
    else:
        y = laplace
        loss = log_p0(y) - log_mixed(y)
    rdp = lmo.subsampled_rdp(law, 1.0, q)
    orders = lmo.ORDERS.astype(float)

    def violations(rdp_bound: np.ndarray) -> int:
        count = 0
        for t in np.linspace(0.05, loss.max(), 40):
            tail = (loss > t).mean()
            bound = np.exp(((orders - 1) * (rdp_bound - t)).min())
            count += tail - 4 * math.sqrt(tail * (1 - tail) / n) > bound
        return count

    assert violations(rdp) == 0
    assert violations(rdp / POWER[direction]) > 0


def test_mixture_mgf_matches_its_draws():
    law = LMONoise(a1=0.4, k=2.0, theta=0.5, a3=0.3, lam=2.0, a4=0.7, lo=0.2, hi=1.1)
    u = law.sample((400_000,), torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    for t in (-2.0, -0.5, 0.5, 1.5):
        assert law.log_mgf(np.array([t]))[0] == pytest.approx(math.log(np.exp(t * u).mean()), abs=0.01)
    assert np.isinf(law.log_mgf(np.array([1 / (0.4 * 0.5) + 0.1]))[0])  # past the Gamma part's radius


def test_calibrate_meets_the_target_and_scales_only_the_weights():
    law = LMONoise(a1=0.5, k=2.0, theta=1.0, a3=0.3, lam=2.0, a4=0.2, lo=0.5, hi=1.5)
    tuned = lmo.calibrate(law, 3.0, 1.0, 0.01, 500, 1e-5)
    eps = lmo.epsilon(tuned, 1.0, 0.01, 500, 1e-5)
    assert eps <= 3.0
    assert lmo.epsilon(tuned.scaled(1.01), 1.0, 0.01, 500, 1e-5) > eps
    ratio = tuned.a1 / law.a1
    assert tuned.a3 / law.a3 == pytest.approx(ratio) and tuned.a4 / law.a4 == pytest.approx(ratio)
    assert (tuned.k, tuned.theta, tuned.lam, tuned.lo, tuned.hi) == (law.k, law.theta, law.lam, law.lo, law.hi)
    point = lmo.calibrate(LMONoise.point_mass(1.0), 3.0, 1.0, 0.01, 500, 1e-5)
    assert lmo.epsilon(point, 1.0, 0.01, 500, 1e-5) == pytest.approx(3.0, rel=2e-3)


@pytest.mark.parametrize(
    "fields,key",
    [(dict(a1=-0.1), "lmo.a1"), (dict(theta=0.0), "lmo.theta"), (dict(lam=0.0), "lmo.lam"), (dict(lo=2.0, hi=1.0), "lmo.lo"),
     (dict(a4=0.0), "U is 0")],
)
def test_bad_mixtures_are_refused_naming_the_key(fields, key):
    with pytest.raises(ValueError, match=key):
        LMONoise(**fields)


def test_out_of_reach_target_and_bad_arguments():
    with pytest.raises(ValueError, match="out of reach"):
        lmo.calibrate(LMONoise.point_mass(1.0), 1e-9, 1.0, 1.0, 10**6, 1e-12)
    with pytest.raises(ValueError, match="delta"):
        lmo.epsilon(LMONoise.point_mass(1.0), 1.0, 0.1, 10, 0.0)
    with pytest.raises(ValueError, match="l1_bound"):
        lmo.epsilon(LMONoise.point_mass(1.0), 0.0, 0.1, 10, 1e-5)


def test_sampler_draws_the_law_and_is_keyed():
    law = LMONoise(a1=0.5, k=3.0, theta=1.0, a3=0.2, lam=1.0, a4=0.3, lo=0.5, hi=1.0)
    noise = LaplaceMixtureNoise(law, 0.7, 2.0, seed=3)
    x = noise.sample(0, "w", torch.zeros(600_000)).double()
    expected = (0.7 * 2.0) ** 2 * law.noise_second_moment()  # E[Z^2] = scale^2 * 2 E[U^-2]
    assert x.pow(2).mean().item() == pytest.approx(expected, rel=0.05)
    assert abs(x.mean().item()) < 5 * math.sqrt(expected / 600_000)
    big = torch.zeros(3 * (1 << 20) + 5)
    LaplaceMixtureNoise(law, 0.7, 2.0, seed=3).add_(4, {"w": big}, workers=1)
    other = torch.zeros_like(big)
    LaplaceMixtureNoise(law, 0.7, 2.0, seed=3).add_(4, {"w": other}, workers=3)
    assert torch.equal(big, other) and not torch.equal(big, LaplaceMixtureNoise(law, 0.7, 2.0, seed=4).sample(4, "w", big))


def test_accountant_history_epsilon_and_resume():
    law = LMONoise(a1=0.5, k=2.0, theta=1.0, a3=0.0, a4=0.5, lo=0.5, hi=1.0)
    acc = LMOAccountant(1e-5, law)
    acc.step(0.8, 0.01, 40)
    acc.step(1.2, 0.02, 10)
    expected = lmo.epsilon_of_history([(law.scaled(1 / 0.8), 0.01, 40), (law.scaled(1 / 1.2), 0.02, 10)], 1e-5)
    assert acc.epsilon() == pytest.approx(expected, rel=1e-12)
    assert acc.epsilon_after(0.8, 0.01, 5) > acc.epsilon()
    resumed = LMOAccountant(1e-5, law)
    resumed.load_state_dict(acc.state_dict())
    assert resumed.epsilon() == acc.epsilon()
    with pytest.raises(ValueError, match="cannot be accounted"):
        LMOAccountant(1e-5, law.scaled(2.0)).load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="cannot be accounted"):
        PrivacyAccountant(1e-5).load_state_dict({**acc.state_dict(), "accountant": "pld"})
    with pytest.raises(ValueError, match="cannot be accounted"):
        LMOAccountant(1e-5, law).load_state_dict(PrivacyAccountant(1e-5).state_dict())
