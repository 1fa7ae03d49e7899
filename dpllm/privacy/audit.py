"""Empirical privacy lower bounds from membership guesses on randomly inserted canaries.

Privacy auditing with one training run (Steinke, Nasr & Jagielski, NeurIPS 2023): each of m
canaries is included independently with probability 1/2; the auditor guesses "in" or "out" for
r of them (abstaining on the rest). If training is epsilon-DP, the number of correct guesses is
stochastically dominated by Binomial(r, e^eps / (1 + e^eps)), so observing v correct guesses
rejects every epsilon whose tail P[Binomial(r, p_eps) >= v] is below beta. The supremum of the
rejected epsilons is a lower bound holding with confidence 1 - beta (delta is taken as 0, which
makes the bound slightly optimistic for an (eps, delta) mechanism; the bench reports it next to
the accountant's epsilon, which it must not exceed).
"""

from __future__ import annotations

import math

from scipy.stats import binom


def tail(correct: int, guesses: int, epsilon: float) -> float:
    """P[Binomial(guesses, e^eps/(1+e^eps)) >= correct]."""
    p = 1.0 / (1.0 + math.exp(-epsilon))
    return float(binom.sf(correct - 1, guesses, p))


def epsilon_lower_bound(correct: int, guesses: int, beta: float = 0.05, tol: float = 1e-6) -> float:
    """The largest epsilon rejected at level ``beta`` by ``correct`` right guesses out of ``guesses``."""
    if not 0 <= correct <= guesses:
        raise ValueError(f"need 0 <= correct <= guesses, got {correct} and {guesses}")
    if guesses == 0 or tail(correct, guesses, 0.0) >= beta:
        return 0.0  # not even eps = 0 (random guessing) is rejected
    lo, hi = 0.0, 1.0
    while tail(correct, guesses, hi) < beta:
        lo, hi = hi, hi * 2
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if tail(correct, guesses, mid) < beta:
            lo = mid
        else:
            hi = mid
    return lo
