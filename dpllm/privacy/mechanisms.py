"""The noise mechanisms a run can use (``privacy.mechanism``): each is its plan's math, its
accountant and its sampler, so the trainer and the steps never branch on which one runs."""

from __future__ import annotations

from dpllm.privacy import accounting, lmo
from dpllm.privacy.accountant import LMOAccountant, PrivacyAccountant
from dpllm.privacy.noise import GaussianNoise, KeyedNoise

MECHANISMS = ("gaussian", "lmo")


class GaussianMechanism:
    """N(0, (sigma C)^2) per coordinate on L2-clipped sums; PLD or RDP accounting."""

    name = "gaussian"
    clip_norm = "l2"

    def __init__(self, accountant: str = "pld") -> None:
        self.accountant_name = accountant

    def epsilon(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        return accounting.compute_epsilon(noise_multiplier, sample_rate, steps, delta, self.accountant_name)

    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        return accounting.calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, self.accountant_name)

    def max_steps_within(self, noise_multiplier: float, sample_rate: float, delta: float, target_epsilon: float, limit: int) -> int:
        return accounting.max_steps_within(noise_multiplier, sample_rate, delta, target_epsilon, self.accountant_name, limit)

    def accountant(self, delta: float) -> PrivacyAccountant:
        return PrivacyAccountant(delta, self.accountant_name)

    def noise(self, noise_multiplier: float, max_grad_norm: float, seed: int, secure: bool) -> KeyedNoise:
        return GaussianNoise(noise_multiplier, max_grad_norm, seed=seed, secure=secure)


class LMOMechanism:
    """LMO-DP: ``s C Laplace(0, 1/U)`` per coordinate, ``U`` from ``law``, on L1-clipped sums. The
    noise multiplier ``s`` scales the law's noise (``law.scaled(1/s)``), as sigma scales the
    Gaussian's; accounting is lmo.py's RDP bound at L1 sensitivity 1."""

    name = "lmo"
    clip_norm = "l1"
    accountant_name = "lmo-rdp"

    def __init__(self, law: lmo.LMONoise) -> None:
        self.law = law

    def epsilon(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        return lmo.epsilon(self.law.scaled(1 / noise_multiplier), 1.0, sample_rate, steps, delta)

    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        return 1 / lmo.calibrate_factor(self.law, target_epsilon, 1.0, sample_rate, steps, delta)

    def max_steps_within(self, noise_multiplier: float, sample_rate: float, delta: float, target_epsilon: float, limit: int) -> int:
        return lmo.max_steps_within(self.law.scaled(1 / noise_multiplier), 1.0, sample_rate, delta, target_epsilon, limit)

    def accountant(self, delta: float) -> LMOAccountant:
        return LMOAccountant(delta, self.law)

    def noise(self, noise_multiplier: float, max_grad_norm: float, seed: int, secure: bool) -> KeyedNoise:
        return lmo.LaplaceMixtureNoise(self.law, noise_multiplier, max_grad_norm, seed=seed, secure=secure)
