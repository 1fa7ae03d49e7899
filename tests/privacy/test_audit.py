import math

import pytest
import torch

from dpllm.distributed.env import DistEnv
from dpllm.distributed.local import run_on_ranks
from dpllm.privacy.accounting import calibrate_noise_multiplier
from dpllm.privacy.audit import epsilon_lower_bound, p_value, tail
from dpllm.training.canary_audit import CanaryAudit, canary_scores, judge

CLAIMED = 2.0


def test_all_correct_guesses_give_the_closed_form_bound():
    # r right out of r: the tail is p^r, so the bound solves p^r = beta, eps = log(p / (1 - p)).
    p = 0.05 ** (1 / 200)
    assert epsilon_lower_bound(200, 200) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_chance_level_guessing_gives_zero_and_the_tail_is_binomial():
    assert epsilon_lower_bound(100, 200) == 0.0
    assert epsilon_lower_bound(0, 0) == 0.0
    # hand-worked: 2 right of 2 at eps = 0 is (1/2)^2; 1 or more right of 2 is 3/4.
    assert tail(2, 2, 0.0) == pytest.approx(0.25) and tail(1, 2, 0.0) == pytest.approx(0.75)
    bound = epsilon_lower_bound(150, 200)
    assert tail(150, 200, bound) == pytest.approx(0.05, abs=1e-4)
    with pytest.raises(ValueError):
        epsilon_lower_bound(3, 2)


def test_the_delta_term_is_theorem_5_2_worked_by_hand():
    # r = 2 guesses, both right, eps = 0: f(2) = 1/4, f(1) = 3/4, f(0) = 1, so the max over i of
    # (f(2 - i) - f(2)) / i is max(1/2, 3/8) = 1/2 and the bound is 1/4 + 2 m delta / 2.
    assert p_value(2, 2, 0.0, canaries=10, delta=0.01) == pytest.approx(0.25 + 0.1)
    assert p_value(150, 200, 1.0) == tail(150, 200, 1.0)
    with_delta = epsilon_lower_bound(1900, 2000, canaries=100_000, delta=1e-5)
    assert 0 < with_delta < epsilon_lower_bound(1900, 2000)
    assert p_value(1900, 2000, with_delta, 100_000, 1e-5) == pytest.approx(0.05, abs=1e-4)


def _audit_results(world_size: int) -> list:
    audit = CanaryAudit()
    inserted = torch.rand(audit.canaries, generator=torch.Generator().manual_seed(0)) < 0.5
    sigma = calibrate_noise_multiplier(CLAIMED, audit.delta, audit.sample_rate, audit.steps)
    results = []
    for divisor in (1, 2, 4):
        if world_size == 1:
            scores, eps = canary_scores(DistEnv(), audit, inserted, sigma, divisor, seed=7)
        else:
            ranks = run_on_ranks(world_size, canary_scores, audit, inserted, sigma, divisor, 7)
            assert torch.equal(ranks[0][0], ranks[1][0])  # replicated parameters
            scores, eps = ranks[0]
        results.append((scores, judge(audit, scores, inserted, eps)))
    return results


def _check_power(results) -> None:
    (_, honest), (_, halved), (_, quartered) = results
    assert honest.accountant_epsilon == pytest.approx(CLAIMED, rel=1e-3)
    assert honest.lower_bound < CLAIMED  # the real step keeps its promise
    assert halved.lower_bound > CLAIMED and quartered.lower_bound > CLAIMED  # and the audit catches sigma / 2, / 4


def test_canary_audit_through_the_private_step_flags_a_noise_divided_by_two_or_four():
    _check_power(_audit_results(1))


@pytest.mark.slow
def test_canary_audit_through_the_sharded_step_on_two_processes():
    one, two = _audit_results(1), _audit_results(2)
    _check_power(two)
    for (a, _), (b, _) in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # the same noise, added once
