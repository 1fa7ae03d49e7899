"""Differential privacy: per-sample clipping, noise, Poisson sampling and accounting."""

from dpllm.privacy.clipper import PerSampleClipper
from dpllm.privacy.rules import UnsupportedModuleError

__all__ = ["PerSampleClipper", "UnsupportedModuleError"]
