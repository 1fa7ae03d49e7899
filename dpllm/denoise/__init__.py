"""Random-matrix-theory denoising of noisy gradient matrices (post-processing: no privacy cost)."""

from dpllm.denoise.rmt import rmt_denoise, rmt_denoise_batched, shrink, signal_from_outlier, threshold

__all__ = ["rmt_denoise", "rmt_denoise_batched", "shrink", "signal_from_outlier", "threshold"]
