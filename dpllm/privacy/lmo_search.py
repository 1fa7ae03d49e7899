"""LMO-DP's offline search: the law of U whose noise is most useful at a privacy budget.

Two objectives, each of the law calibrated to the budget:
- ``usefulness`` (the default, the LMO-DP paper's): ``P(|Z| <= gamma) = 1 - M(-gamma)``, the
  chance that a coordinate's noise is within gamma (in units of the L1 clip; the paper's
  gamma is 0.9), to maximise;
- ``second_moment``: ``E[Z^2] = 2 E[U^-2]``, what an SGD step's variance grows with, to minimise.
The search runs on the sound epsilon of lmo.py, so what it finds is what a run then spends. It
samples shapes (the weights of the three parts, the Gamma's k, the uniform's range; theta and
lam are fixed at 1, as the weights already scale them), calibrates each to the budget, keeps the
best and refines it by local perturbations. Plain Laplace (a point mass) is always a candidate,
so the result is never worse than it by the objective searched.
"""

from __future__ import annotations

import math

import numpy as np

from dpllm.privacy import lmo
from dpllm.privacy.lmo import LMONoise


def _random_shape(rng: np.random.Generator) -> LMONoise:
    weights = rng.dirichlet(np.ones(3)) * (rng.random(3) < 0.7)  # parts dropped at random: pure families too
    if not weights.any():
        weights[rng.integers(3)] = 1.0
    lo = float(rng.uniform(0.0, 1.0))
    return LMONoise(
        a1=float(weights[0]), k=float(math.exp(rng.uniform(math.log(0.5), math.log(20.0)))),
        a3=float(weights[1]), a4=float(weights[2]), lo=lo, hi=lo + float(rng.uniform(0.0, 2.0)),
    )


def _perturbed(law: LMONoise, rng: np.random.Generator, width: float) -> LMONoise:
    jitter = lambda value: float(value * math.exp(rng.normal(0.0, width)))  # noqa: E731
    lo = jitter(law.lo) if law.lo > 0 else 0.0
    return LMONoise(
        a1=jitter(law.a1), k=jitter(law.k), a3=jitter(law.a3), a4=jitter(law.a4), lo=lo,
        hi=max(lo, lo + jitter(max(law.hi - law.lo, 1e-3))), theta=law.theta, lam=law.lam,
    )


OBJECTIVES = {
    "usefulness": "the LMO-DP paper's usefulness P(|Z| <= gamma) = 1 - M(-gamma), in units of the L1 clip, maximised",
    "second_moment": "noise second moment per coordinate, E[Z^2] = 2 E[U^-2], in units of the L1 clip, minimised",
}


def _score(shape: LMONoise, target_epsilon: float, sample_rate: float, steps: int, delta: float, objective: str, gamma: float):
    """(loss, calibrated law): the loss is minimised; None where the shape cannot meet the budget."""
    try:
        law = lmo.calibrate(shape, target_epsilon, 1.0, sample_rate, steps, delta)
    except ValueError:
        return None
    return (-law.usefulness(gamma) if objective == "usefulness" else law.noise_second_moment()), law


def search(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, candidates: int = 128, rounds: int = 3, seed: int = 0,
    objective: str = "usefulness", gamma: float = 0.9,
) -> dict:
    """The best law found for the budget by ``objective``, with both objectives' values for it and
    for plain Laplace at the same budget."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    rng = np.random.default_rng(seed)
    score = lambda shape: _score(shape, target_epsilon, sample_rate, steps, delta, objective, gamma)  # noqa: E731
    laplace = score(LMONoise.point_mass(1.0))
    if laplace is None:
        raise ValueError(f"target epsilon {target_epsilon} is out of reach at sample rate {sample_rate} over {steps} steps")
    best = laplace
    for _ in range(candidates):
        scored = score(_random_shape(rng))
        if scored is not None and scored[0] < best[0]:
            best = scored
    for width in (0.5, 0.2, 0.05)[:rounds]:
        for _ in range(max(candidates // 4, 1)):
            scored = score(_perturbed(best[1], rng, width))
            if scored is not None and scored[0] < best[0]:
                best = scored
    law, plain = best[1], laplace[1]
    return {
        "noise": law.to_dict(),
        "objective": objective,
        "objective_text": OBJECTIVES[objective],
        "gamma": gamma,
        "usefulness": law.usefulness(gamma),
        "laplace_usefulness": plain.usefulness(gamma),
        "noise_second_moment": law.noise_second_moment(),
        "laplace_second_moment": plain.noise_second_moment(),
        "epsilon": lmo.epsilon(law, 1.0, sample_rate, steps, delta),
        "target_epsilon": target_epsilon,
        "sample_rate": sample_rate,
        "steps": steps,
        "delta": delta,
        "candidates": candidates,
        "seed": seed,
    }
