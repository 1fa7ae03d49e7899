"""LMO-DP's noise (Laplace of random scale) and a sound accountant for it (stateless math).

Each noised coordinate gets ``Laplace(0, 1/U)``, with its own inverse scale
``U = a1 Gamma(k, theta) + a3 Exp(lam) + a4 Uniform(lo, hi)`` (independent parts; a point mass
``u`` is ``a1 = a3 = 0, a4 = 1, lo = hi = u``). Noise and sensitivity are in the same unit: the
step scales both by the clipping bound, so the accountant sees L1 sensitivity ``l1_bound``.

Soundness, step by step (the README's *LMO-DP* section has the proof in full):

1. One coordinate at shift ``s`` and fixed ``U = u`` is the Laplace mechanism of scale ``1/u``;
   its Rényi divergence of order ``a`` is ``h(s u) / (a-1)`` with
   ``h(x) = log[(a e^{(a-1)x} + (a-1) e^{-a x}) / (2a-1)]`` (Mironov 2017), in both directions.
2. Over ``U``, joint convexity of ``exp((a-1) D_a)`` gives ``g(s) = log E_U[e^{h(sU)}]``
   ``= log[(a M((a-1)s) + (a-1) M(-a s)) / (2a-1)]``, ``M`` the moment generating function of U.
3. The coordinates are independent, so the vector's ``(a-1) D_a`` is ``sum_j g(|v_j|)`` for a
   shift ``v``. ``g`` is a log-moment-generating function of ``s``: convex, ``g(0) = 0``, ``g'(0) = 0``,
   hence non-decreasing and superadditive on ``s >= 0``; under ``||v||_1 <= l1_bound`` the sum is
   largest with the whole bound on one coordinate: ``g(l1_bound)``. This is why LMO needs L1
   clipping: an L2 bound allows ``||v||_1 = sqrt(d) ||v||_2``.
4. Poisson subsampling: Zhu & Wang (2019), Theorem 6, bounds the subsampled mechanism's RDP at
   integer orders from the base mechanism's, for any mechanism.
5. Composition adds RDP; the (epsilon, delta) conversion is Canonne, Kamath & Steinke (2020),
   Proposition 12 (dp-accounting's RDP accountant uses the same).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import integrate
from scipy.special import gammaln, logsumexp

from dpllm.privacy.noise import KeyedNoise

ORDERS = np.arange(2, 513)  # integer orders: Zhu & Wang's bound is for integers
MAX_SCALE = 1e6  # calibrate's search range for the factor on U


@dataclass(frozen=True)
class LMONoise:
    """The law of the inverse scale ``U = a1 Gamma(k, theta) + a3 Exp(lam) + a4 Uniform(lo, hi)``."""

    a1: float = 0.0
    k: float = 1.0
    theta: float = 1.0
    a3: float = 0.0
    lam: float = 1.0
    a4: float = 1.0
    lo: float = 1.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        for key in ("a1", "a3", "a4"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"lmo.{key} must be a finite weight >= 0, got {value}")
        for key in ("k", "theta", "lam"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"lmo.{key} must be finite and > 0 (a zero scale has no distribution), got {value}")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and 0 <= self.lo <= self.hi):
            raise ValueError(f"lmo.lo and lmo.hi must satisfy 0 <= lo <= hi < inf, got lo={self.lo}, hi={self.hi}")
        if self.a1 == 0 and self.a3 == 0 and self.a4 * self.hi == 0:
            raise ValueError("lmo: U is 0 (a1 = a3 = 0 and a4 * hi = 0): the Laplace scale 1/U would be infinite")

    @classmethod
    def point_mass(cls, u: float) -> LMONoise:
        """Laplace noise of fixed scale ``1/u``."""
        return cls(a1=0.0, a3=0.0, a4=1.0, lo=u, hi=u)

    def scaled(self, factor: float) -> LMONoise:
        """The law of ``factor * U`` (noise ``1/factor`` times as large)."""
        if not factor > 0:
            raise ValueError(f"the factor on U must be > 0, got {factor}")
        return replace(self, a1=self.a1 * factor, a3=self.a3 * factor, a4=self.a4 * factor)

    def log_mgf(self, t: np.ndarray) -> np.ndarray:
        """``log E[exp(t U)]``, +inf where it diverges."""
        t = np.asarray(t, dtype=np.float64)
        out = np.zeros_like(t)
        if self.a1:
            x = self.a1 * self.theta * t
            out = out + np.where(x < 1, -self.k * np.log1p(-np.where(x < 1, x, 0.0)), np.inf)
        if self.a3:
            x = self.a3 * t / self.lam
            out = out + np.where(x < 1, -np.log1p(-np.where(x < 1, x, 0.0)), np.inf)
        if self.a4:
            out = out + self.a4 * self.lo * t + _log_expm1_over_x(self.a4 * (self.hi - self.lo) * t)
        return out

    def sample(self, shape, generator: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Draws of U from ``generator`` (each part drawn only where its weight is non-zero)."""
        u = torch.zeros(shape, dtype=dtype, device=device)
        if self.a1:
            gamma = torch._standard_gamma(torch.full(shape, float(self.k), dtype=dtype, device=device), generator=generator)
            u.add_(gamma, alpha=self.a1 * self.theta)
        if self.a3:
            u.add_(torch.empty_like(u).exponential_(self.lam, generator=generator), alpha=self.a3)
        if self.a4:
            u.add_(torch.empty_like(u).uniform_(self.lo, self.hi, generator=generator) if self.hi > self.lo else torch.full_like(u, self.lo), alpha=self.a4)
        return u

    def noise_second_moment(self) -> float:
        """``E[Z^2] = 2 E[U^-2]`` of ``Laplace(0, 1/U)``, from ``U^-2 = int_0^inf t e^{-tU} dt``:
        ``2 int_0^inf t M(-t) dt`` (inf where U's mass near 0 makes it diverge, as for a Gamma
        part with k <= 2 and nothing else)."""
        if self.a1 == 0 and self.a3 == 0 and self.lo == self.hi:
            return 2.0 / (self.a4 * self.lo) ** 2
        with warnings.catch_warnings():
            warnings.simplefilter("error", integrate.IntegrationWarning)
            try:
                value, _ = integrate.quad(lambda t: t * math.exp(float(self.log_mgf(np.array(-t)))), 0, np.inf, limit=500)
            except integrate.IntegrationWarning:
                return math.inf
        return 2.0 * value if math.isfinite(value) else math.inf

    def usefulness(self, gamma: float) -> float:
        """The LMO-DP paper's usefulness: ``P(|Z| <= gamma)`` for ``Z ~ Laplace(0, 1/U)``, which is
        ``E[1 - exp(-gamma U)] = 1 - M(-gamma)`` (gamma in units of the L1 clip)."""
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        return 1.0 - math.exp(float(self.log_mgf(np.array(-float(gamma)))))

    def to_dict(self) -> dict:
        return asdict(self)


class LaplaceMixtureNoise(KeyedNoise):
    """``noise_multiplier * max_grad_norm * Laplace(0, 1/U)`` per entry, a fresh ``U ~ law`` for
    each, all from the keyed streams (so sharding, accumulation and resumes see the same noise as
    for Gaussian). The accountant's sensitivity is then 1 in units of ``noise_multiplier * C``
    for L1-clipped sums: ``law.scaled(1 / noise_multiplier)`` at ``l1_bound = 1``.

    A draw beyond the buffer dtype's finite range (U within a rounding of 0) is set to the largest
    finite value: a noise that size destroys the step either way, and an inf would poison the
    optimizer state."""

    clip_norms = ("l1",)

    def __init__(self, law: LMONoise, noise_multiplier: float, max_grad_norm: float, seed: int | None = None, secure: bool = False):
        super().__init__(noise_multiplier, max_grad_norm, seed=seed, secure=secure)
        self.law = law

    def _draw(self, generator: torch.Generator, buffer: torch.Tensor) -> torch.Tensor:
        u = self.law.sample(buffer.shape, generator, dtype=buffer.dtype, device=buffer.device)
        sign = torch.empty_like(buffer).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
        laplace = buffer.exponential_(1.0, generator=generator).mul_(sign)
        big = torch.finfo(buffer.dtype).max
        return laplace.div_(u).nan_to_num_(nan=0.0, posinf=big, neginf=-big)


def _log_expm1_over_x(x: np.ndarray) -> np.ndarray:
    """``log((e^x - 1) / x)``, 0 at x = 0 (the uniform part's log-MGF without its shift)."""
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < 1e-8
    safe = np.where(small, 1.0, x)
    pos = safe > 0
    # e^x - 1 = e^x (1 - e^-x) for x > 0 keeps large x finite
    with np.errstate(over="ignore", invalid="ignore"):  # each branch is used only where it is finite
        value = np.where(pos, safe + np.log(-np.expm1(-np.abs(safe))) - np.log(np.abs(safe)), np.log(np.expm1(safe) / safe))
    return np.where(small, x / 2, value)


def base_log_moment(noise: LMONoise, l1_bound: float, orders: np.ndarray = ORDERS) -> np.ndarray:
    """``(a-1) D_a`` of one unsampled step at L1 sensitivity ``l1_bound``, for each order ``a``:
    ``log[(a M((a-1) l1) + (a-1) M(-a l1)) / (2a-1)]`` (steps 1-3 of the module docstring)."""
    a = np.asarray(orders, dtype=np.float64)
    terms = np.stack([np.log(a) + noise.log_mgf((a - 1) * l1_bound), np.log(a - 1) + noise.log_mgf(-a * l1_bound)])
    return logsumexp(terms, axis=0) - np.log(2 * a - 1)


def subsampled_rdp(noise: LMONoise, l1_bound: float, sample_rate: float, orders: np.ndarray = ORDERS) -> np.ndarray:
    """RDP of one Poisson-subsampled step at each integer order (Zhu & Wang 2019, Theorem 6):
    ``(a-1) eps(a) <= log[(1-q)^{a-1}(a q - q + 1) + C(a,2) q^2 (1-q)^{a-2} e^{eps(2)}
    + 3 sum_{l=3}^{a} C(a,l) q^l (1-q)^{a-l} e^{(l-1) eps(l)}]``."""
    a = np.asarray(orders, dtype=np.int64)
    if sample_rate == 1:
        return base_log_moment(noise, l1_bound, a) / (a - 1)
    ells = np.arange(2, int(a.max()) + 1)
    moments = base_log_moment(noise, l1_bound, ells)  # (l-1) eps(l)
    A, L = a[:, None].astype(np.float64), ells[None, :].astype(np.float64)
    log_q, log_1q = math.log(sample_rate), math.log1p(-sample_rate)
    with np.errstate(invalid="ignore"):
        log_binom = np.where(L <= A, gammaln(A + 1) - gammaln(L + 1) - gammaln(np.maximum(A - L, 0) + 1), -np.inf)
        body = log_binom + L * log_q + (A - L) * log_1q + moments[None, :] + np.where(L >= 3, math.log(3), 0.0)
        body = np.where(L <= A, body, -np.inf)  # inf moments past an order play no part in it
    first = (a - 1) * log_1q + np.log(a * sample_rate - sample_rate + 1)
    return logsumexp(np.concatenate([first[:, None], body], axis=1), axis=1) / (a - 1)


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: np.ndarray = ORDERS) -> float:
    """The smallest (epsilon, delta) conversion over the orders (Canonne, Kamath & Steinke 2020)."""
    a = np.asarray(orders, dtype=np.float64)
    eps = rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = eps[np.isfinite(eps)]
    return max(float(eps.min()), 0.0) if eps.size else math.inf


def check_arguments(l1_bound: float, sample_rate: float, steps: int, delta: float) -> None:
    if not (0 < l1_bound < math.inf):
        raise ValueError(f"l1_bound must be finite and > 0, got {l1_bound}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def epsilon_of_history(history, delta: float, l1_bound: float = 1.0) -> float:
    """epsilon after each (noise, sample_rate, steps) segment in turn: RDP adds over steps."""
    total = np.zeros(len(ORDERS))
    ran = False
    for noise, q, n in history:
        if n > 0:
            total = total + n * subsampled_rdp(noise, l1_bound, q)
            ran = True
    return epsilon_from_rdp(total, delta) if ran else 0.0


def epsilon(noise: LMONoise, l1_bound: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon spent by ``steps`` Poisson-subsampled LMO steps at L1 sensitivity ``l1_bound``."""
    check_arguments(l1_bound, sample_rate, steps, delta)
    return epsilon_of_history([(noise, sample_rate, steps)], delta, l1_bound)


def calibrate(
    noise: LMONoise, target_epsilon: float, l1_bound: float, sample_rate: float, steps: int, delta: float, tol: float = 1e-3
) -> LMONoise:
    """``noise`` scaled (U times a factor) to the least noise whose epsilon is <= the target."""
    return noise.scaled(calibrate_factor(noise, target_epsilon, l1_bound, sample_rate, steps, delta, tol))


def calibrate_factor(
    noise: LMONoise, target_epsilon: float, l1_bound: float, sample_rate: float, steps: int, delta: float, tol: float = 1e-3
) -> float:
    """The largest factor on U (within ``tol``) whose epsilon is <= the target."""
    check_arguments(l1_bound, sample_rate, steps, delta)
    if not 0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    if steps == 0:
        raise ValueError("cannot calibrate noise for 0 steps")

    def eps(factor: float) -> float:
        return epsilon(noise.scaled(factor), l1_bound, sample_rate, steps, delta)

    low, high = 1.0 / MAX_SCALE, 1.0
    if eps(low) > target_epsilon:
        raise ValueError(
            f"target epsilon {target_epsilon} at delta {delta} is out of reach for this lmo mixture: even its noise "
            f"scaled up {MAX_SCALE:g} times spends more over {steps} steps at sample rate {sample_rate}"
        )
    while eps(high) <= target_epsilon:
        low, high = high, high * 2
    while high > low * (1 + tol):  # eps(low) <= target < eps(high)
        mid = math.sqrt(low * high)
        low, high = (mid, high) if eps(mid) <= target_epsilon else (low, mid)
    return low


def max_steps_within(noise: LMONoise, l1_bound: float, sample_rate: float, delta: float, target_epsilon: float, limit: int) -> int:
    """The most steps (at most ``limit``) whose epsilon stays within ``target_epsilon``."""
    rdp = subsampled_rdp(noise, l1_bound, sample_rate)
    lo, hi = 0, limit + 1  # epsilon after lo steps fits, after hi it does not (or hi is past the limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon_from_rdp(mid * rdp, delta) <= target_epsilon else (lo, mid)
    return lo


def load_mixture(path: str | Path) -> LMONoise:
    """A law saved by ``launch/lmo_search.py`` (its ``noise`` entry)."""
    with open(path, encoding="utf-8") as f:
        return LMONoise(**json.load(f)["noise"])
