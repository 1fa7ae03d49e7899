"""Accounting against dp-accounting's own event API, calibration, and bad arguments."""

import math

import dp_accounting
import pytest

from dpllm.privacy.accountant import PrivacyAccountant, _RunningPLD
from dpllm.privacy.accounting import calibrate_noise_multiplier, compute_epsilon


def _reference(sigma, q, steps, delta, kind):
    acc = dp_accounting.pld.PLDAccountant() if kind == "pld" else dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@pytest.mark.parametrize("sigma,q,steps,delta", [(1.0, 0.01, 500, 1e-5), (0.7, 0.05, 40, 1e-6), (2.0, 1.0, 3, 1e-5)])
def test_matches_dp_accounting_event_api(kind, sigma, q, steps, delta):
    ours = compute_epsilon(sigma, q, steps, delta, accountant=kind)
    assert ours == pytest.approx(_reference(sigma, q, steps, delta, kind), rel=1e-6)


def test_stateful_accountant_matches_composition_of_segments():
    acc = PrivacyAccountant(delta=1e-5)
    for _ in range(30):
        acc.step(1.1, 0.02)
    acc.step(0.9, 0.04, count=10)
    ref = dp_accounting.pld.PLDAccountant()
    ref.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)), 30))
    ref.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.04, dp_accounting.GaussianDpEvent(0.9)), 10))
    assert acc.steps == 40
    assert acc.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-6)


def test_step_by_step_epsilon_matches_dp_accounting_whatever_steps_were_queried(monkeypatch):
    """The accountant extends its PLD one step at a time; the values stay dp-accounting's, and do
    not depend on which steps were queried or on a resume in between."""
    monkeypatch.setattr(_RunningPLD, "anchor_every", 4)  # cross several anchors in a few steps
    sigma, q, delta = 1.0, 0.02, 1e-5
    every, sparse, resumed = (PrivacyAccountant(delta) for _ in range(3))
    for n in range(1, 11):
        every.step(sigma, q)
        sparse.step(sigma, q)
        assert every.epsilon() == pytest.approx(_reference(sigma, q, n, delta, "pld"), rel=1e-9)
        if n == 3:
            sparse.epsilon()
        if n == 6:
            resumed.load_state_dict(every.state_dict())
        if n > 6:
            resumed.step(sigma, q)
        if n == 7:
            resumed.epsilon()
    assert sparse.epsilon() == resumed.epsilon() == every.epsilon()
    for acc in (every, sparse):
        acc.step(0.8, 0.04, count=2)  # a new segment, e.g. a resume with another plan
    ref = dp_accounting.pld.PLDAccountant()
    ref.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 10))
    ref.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.04, dp_accounting.GaussianDpEvent(0.8)), 2))
    assert every.epsilon() == sparse.epsilon() == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


def test_accountant_state_round_trip():
    acc = PrivacyAccountant(delta=1e-5, accountant="rdp")
    acc.step(1.0, 0.01, count=100)
    restored = PrivacyAccountant(delta=1e-5, accountant="rdp")
    restored.load_state_dict(acc.state_dict())
    restored.step(1.0, 0.01, count=50)
    assert restored.epsilon() == pytest.approx(compute_epsilon(1.0, 0.01, 150, 1e-5, "rdp"), rel=1e-9)
    with pytest.raises(ValueError, match="differs"):
        PrivacyAccountant(delta=1e-6, accountant="rdp").load_state_dict(acc.state_dict())


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_inverts_compute_epsilon(kind, target):
    q, steps, delta = 0.01, 300, 1e-5
    sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant=kind)
    assert compute_epsilon(sigma, q, steps, delta, kind) <= target
    # ...and is not needlessly large: 1% less noise overspends.
    assert compute_epsilon(sigma * 0.99, q, steps, delta, kind) > target


def test_more_steps_spend_more():
    eps = [compute_epsilon(1.0, 0.01, n, 1e-5) for n in (0, 1, 10, 100)]
    assert eps[0] == 0.0 and eps == sorted(eps) and len(set(eps)) == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(delta=1.0), "delta"),
        (dict(steps=-3), "steps"),
        (dict(accountant="moments"), "accountant"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=match):
        compute_epsilon(**args)


def test_zero_noise_is_infinite_epsilon():
    assert math.isinf(compute_epsilon(0.0, 0.01, 10, 1e-5))


@pytest.mark.parametrize("target", [0.0, -1.0, float("inf")])
def test_impossible_targets_raise(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(target, 1e-5, 0.01, 100)


def test_unreachable_target_raises():
    # Full-batch steps, a million of them, at epsilon 1e-4: beyond any sane noise multiplier.
    with pytest.raises(ValueError, match="out of reach"):
        calibrate_noise_multiplier(1e-4, 1e-10, 1.0, 10**6, accountant="rdp")


def test_delta_below_the_pld_resolution_is_named_not_called_out_of_reach():
    # dp-accounting's own PLD reports inf at this delta even for heavy noise; RDP does not.
    assert math.isinf(_reference(1000.0, 0.01, 100, 1e-30, "pld"))
    with pytest.raises(ValueError, match="below what the PLD accountant resolves"):
        calibrate_noise_multiplier(8.0, 1e-30, 0.01, 100)
    sigma = calibrate_noise_multiplier(8.0, 1e-30, 0.01, 100, accountant="rdp")
    assert _reference(sigma, 0.01, 100, 1e-30, "rdp") <= 8.0 < _reference(sigma * 0.99, 0.01, 100, 1e-30, "rdp")
