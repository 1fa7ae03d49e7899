"""Privacy math for Poisson-subsampled Gaussian steps, on dp-accounting (stateless).

``compute_epsilon`` and ``calibrate_noise_multiplier`` answer for a plan of ``steps`` identical
steps; the stateful ``PrivacyAccountant`` (accountant.py) tracks what a run really spent.
"""

from __future__ import annotations

import math
from functools import lru_cache

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as pld_lib

ACCOUNTANTS = ("pld", "rdp")
PLD_DISCRETIZATION = 1e-4
SEARCH_DISCRETIZATION = 1e-3  # coarser grid while bisecting; the result is re-checked on the fine one
MAX_NOISE_MULTIPLIER = 1e3


def check_arguments(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def step_event(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    """One DP-SGD step: a Gaussian mechanism on a Poisson sample with rate ``sample_rate``."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sample_rate == 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)


@lru_cache(maxsize=32)
def step_pld(noise_multiplier: float, sample_rate: float, discretization: float = PLD_DISCRETIZATION) -> pld_lib.PrivacyLossDistribution:
    """The PLD of one step: the same construction dp_accounting's PLDAccountant uses, built once."""
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=discretization,
        sampling_prob=sample_rate,
    )


def composed_pld(segments, discretization: float = PLD_DISCRETIZATION) -> pld_lib.PrivacyLossDistribution | None:
    """The PLD of running each (noise_multiplier > 0, sample_rate, steps > 0) segment in turn."""
    total = None
    for s, q, n in segments:
        part = step_pld(s, q, discretization).self_compose(n)
        total = part if total is None else total.compose(part)
    return total


def epsilon_of_history(
    history: list[tuple[float, float, int]],
    delta: float,
    accountant: str = "pld",
    discretization: float = PLD_DISCRETIZATION,
) -> float:
    """epsilon after running each (noise_multiplier, sample_rate, steps) segment in turn."""
    segments = [(s, q, n) for s, q, n in history if n > 0]
    if not segments:
        return 0.0
    if any(s == 0 for s, _, _ in segments):
        return math.inf
    if accountant == "rdp":
        rdp = dp_accounting.rdp.RdpAccountant()
        for s, q, n in segments:
            rdp.compose(step_event(s, q), n)
        return rdp.get_epsilon(delta)
    return max(composed_pld(segments, discretization).get_epsilon_for_delta(delta), 0.0)


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "pld") -> float:
    """epsilon spent by ``steps`` Poisson-subsampled Gaussian steps, at ``delta``."""
    check_arguments(noise_multiplier, sample_rate, steps, delta, accountant)
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "pld", tol: float = 1e-3
) -> float:
    """The smallest noise multiplier (within ``tol``) whose epsilon after ``steps`` is <= target."""
    check_arguments(1.0, sample_rate, steps, delta, accountant)
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    if steps == 0:
        raise ValueError("cannot calibrate noise for 0 steps")

    def eps(sigma: float, discretization: float = SEARCH_DISCRETIZATION) -> float:
        return epsilon_of_history([(sigma, sample_rate, steps)], delta, accountant, discretization)

    ceiling = eps(MAX_NOISE_MULTIPLIER)
    if math.isinf(ceiling) and accountant == "pld":
        raise ValueError(
            f"delta {delta} is below what the PLD accountant resolves (it moves tail masses of about 1e-15 "
            "to infinite loss, so any epsilon it reports there is inf): use a larger delta or accountant='rdp'"
        )
    if ceiling > target_epsilon:
        raise ValueError(
            f"target epsilon {target_epsilon} at delta {delta} is out of reach: even noise multiplier "
            f"{MAX_NOISE_MULTIPLIER:g} spends more over {steps} steps at sample rate {sample_rate}"
        )
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
    while high - low > tol * high:
        mid = (low + high) / 2
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    while eps(high, PLD_DISCRETIZATION) > target_epsilon:
        high *= 1 + tol
    return high


def max_steps_within(
    noise_multiplier: float, sample_rate: float, delta: float, target_epsilon: float, accountant: str = "pld", limit: int = 10**7
) -> int:
    """The most steps whose epsilon stays within ``target_epsilon`` (0 if not even one)."""
    if compute_epsilon(noise_multiplier, sample_rate, 1, delta, accountant) > target_epsilon:
        return 0
    lo, hi = 1, 2
    while hi <= limit and compute_epsilon(noise_multiplier, sample_rate, hi, delta, accountant) <= target_epsilon:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if compute_epsilon(noise_multiplier, sample_rate, mid, delta, accountant) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo
