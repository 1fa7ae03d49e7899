"""Top singular triplets above a threshold, without a full SVD.

Randomized block subspace iteration with Rayleigh-Ritz (Halko, Martinsson & Tropp 2011),
batched over a stack of same-shape matrices. The block holds k wanted + p extra vectors; k
doubles until the smallest singular value found lies below the threshold, so every value
above it is captured. Iteration stops when each wanted triplet's residual
||A v_i - s_i u_i|| is below ``rtol * s_1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_DIM_FOR_PARTIAL = 1024


def partial_pays(m: int, n: int, device: torch.device) -> bool:
    """On CPUs LAPACK's full SVD beat this iteration at every size measured (bench/denoise_overhead.py);
    on GPUs, where batched SVDs of large matrices are slow, use it from ~1k rows and columns."""
    return device.type == "cuda" and min(m, n) >= MIN_DIM_FOR_PARTIAL


def _orthonormal(x: Tensor) -> Tensor:
    return torch.linalg.qr(x).Q


def _ritz(a: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ub, s, vh = torch.linalg.svd(q.transpose(-2, -1) @ a, full_matrices=False)
    return q @ ub, s, vh


def _block_svd(a: Tensor, width: int, wanted: int, threshold: float, rtol: float, max_iter: int, generator):
    k, m, n = a.shape
    omega = torch.randn(k, n, width, dtype=a.dtype, device=a.device, generator=generator)
    q = _orthonormal(a @ omega)
    at = a.transpose(-2, -1)
    for _ in range(max_iter):
        q = _orthonormal(a @ _orthonormal(at @ q))
        u, s, vh = _ritz(a, q)
        # residuals of the triplets that matter: those above the threshold, at most `wanted`
        residual = (a @ vh.transpose(-2, -1) - u * s.unsqueeze(-2)).norm(dim=-2)  # (k, width)
        matters = (s > threshold) & (torch.arange(width, device=a.device) < wanted)
        if not (residual > rtol * s[:, :1])[matters].any():
            break
    return u, s, vh


def top_singular_triplets(
    a: Tensor, threshold: float, start: int = 8, oversample: int = 8, rtol: float = 1e-6, max_iter: int = 300, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(u, s, vh) for a stack (k, m, n) holding at least every singular value above ``threshold``.

    Falls back to a full SVD once the block would exceed half the smaller dimension.
    """
    k, m, n = a.shape
    generator = torch.Generator(device=a.device).manual_seed(seed)
    wanted = start
    while True:
        width = wanted + oversample
        if width > min(m, n) // 2:
            return torch.linalg.svd(a, full_matrices=False)
        u, s, vh = _block_svd(a, width, wanted, threshold, rtol, max_iter, generator)
        if bool((s[:, wanted - 1] <= threshold).all()):
            return u, s, vh
        wanted *= 2
