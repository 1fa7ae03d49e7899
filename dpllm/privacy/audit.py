"""Empirical privacy lower bounds from membership guesses on randomly inserted canaries.

Privacy auditing with one training run (Steinke, Nasr & Jagielski, NeurIPS 2023): each of m
canaries is included independently with probability 1/2; the auditor guesses "in" or "out" for
r of them (abstaining on the rest). If training is (epsilon, delta)-DP, the probability of v or
more right guesses is at most

    f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,   f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]

(their Theorem 5.2). Observing v right guesses rejects every epsilon whose bound is below beta;
the supremum of the rejected epsilons is a lower bound holding with confidence 1 - beta. The
number of guesses must be fixed before the scores are seen (choosing it from the scores would
test many hypotheses at once).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom


def tail(correct: int, guesses: int, epsilon: float) -> float:
    """P[Binomial(guesses, e^eps/(1+e^eps)) >= correct]."""
    p = 1.0 / (1.0 + math.exp(-epsilon))
    return float(binom.sf(correct - 1, guesses, p))


def p_value(correct: int, guesses: int, epsilon: float, canaries: int = 0, delta: float = 0.0) -> float:
    """The largest probability an (epsilon, delta)-DP run gives ``correct`` or more right guesses."""
    f = tail(correct, guesses, epsilon)
    if delta == 0 or correct == 0:
        return f
    p = 1.0 / (1.0 + math.exp(-epsilon))
    i = np.arange(1, correct + 1)
    return f + 2 * canaries * delta * float(np.max((binom.sf(correct - i - 1, guesses, p) - f) / i))


def epsilon_lower_bound(
    correct: int, guesses: int, canaries: int = 0, delta: float = 0.0, beta: float = 0.05, tol: float = 1e-6
) -> float:
    """The largest epsilon rejected at level ``beta`` by ``correct`` right guesses out of ``guesses``
    among ``canaries`` canaries, for a claimed ``delta``."""
    if not 0 <= correct <= guesses:
        raise ValueError(f"need 0 <= correct <= guesses, got {correct} and {guesses}")
    if delta > 0 and canaries < guesses:
        raise ValueError(f"the {guesses} guesses are about at most the {canaries} canaries")

    def rejected(eps: float) -> bool:
        return p_value(correct, guesses, eps, canaries, delta) < beta

    if guesses == 0 or not rejected(0.0):
        return 0.0  # not even eps = 0 (random guessing) is rejected
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, hi * 2
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo
