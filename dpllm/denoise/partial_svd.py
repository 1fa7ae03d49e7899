"""Top singular triplets above a threshold, without a full SVD.

Block Lanczos (a block Krylov space of A^T A, fully reorthogonalized) with Rayleigh-Ritz,
batched over a stack of same-shape matrices. A Krylov space finds the extreme singular
values in far fewer passes over A than subspace iteration, which matters when a spike sits
just above the noise bulk; each step costs two products of A with a block of b vectors.

It stops, for each matrix, when
  * every Ritz value above the threshold has converged: its residual ||A^T u - s v|| is below
    ``rtol * s_1`` plus the floor that rounding leaves in it (~ eps s_1^2 / s); and
  * no singular value above the threshold can hide behind the largest Ritz value below it,
    theta. Lanczos from one random start, after k products with A^T A, underestimates the top
    eigenvalue by a factor (1 - eps) or more with probability at most
    p = 1.648 sqrt(n) exp(-(2k - 1) sqrt(eps)) (Kuczynski & Wozniakowski 1992). The block
    space contains the Krylov space of each of its b independent random columns, so all b
    would have to fail: probability p^b. With eps = 1 - theta^2 / threshold^2, and k counting
    only the steps past those the r values already found could have used (a heuristic
    extension beyond the top value), p^b must fall below ``miss_probability``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MIN_DIM_FOR_PARTIAL = 384
ROUNDING_SLACK = 64
INITIAL_BLOCKS = 24


def partial_pays(m: int, n: int) -> bool:
    """From a few hundred rows and columns block Lanczos beats LAPACK's full SVD on CPUs (2x at
    512 x 512, 10x at 2048 x 2048; below 384 the full SVD is as fast or faster)."""
    return min(m, n) >= MIN_DIM_FOR_PARTIAL


def _orthonormal_complement(x: Tensor, basis: Tensor) -> Tensor:
    """An orthonormal basis of x's part orthogonal to ``basis`` (twice projected and orthonormalized:
    once is not enough in floating point, and an x almost inside ``basis`` leaves rounding noise)."""
    for _ in range(2):
        x = x - basis @ (basis.transpose(-2, -1) @ x)
        x = torch.linalg.qr(x).Q
    return x


def top_singular_triplets(
    a: Tensor,
    threshold: float,
    block: int = 8,
    rtol: float = 1e-6,
    miss_probability: float = 1e-6,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(u, s, vh) for a stack (k, m, n) holding at least every singular value above ``threshold``.

    Falls back to a full SVD once the Krylov space would exceed half the smaller dimension.
    """
    k, m, n = a.shape
    if m < n:  # iterate in the smaller dimension
        u, s, vh = top_singular_triplets(a.transpose(-2, -1), threshold, block, rtol, miss_probability, seed)
        return vh.transpose(-2, -1), s, u.transpose(-2, -1)
    max_cols = n // 2
    if 2 * block > max_cols:
        return torch.linalg.svd(a, full_matrices=False)
    dtype, device = a.dtype, a.device
    capacity = min(INITIAL_BLOCKS * block, max_cols)  # grown when needed: most stacks stop near 16 blocks
    basis = torch.zeros(k, n, capacity, dtype=dtype, device=device)
    a_basis = torch.zeros(k, m, capacity, dtype=dtype, device=device)  # A V
    ata_basis = torch.zeros(k, n, capacity, dtype=dtype, device=device)  # A^T A V
    gen = torch.Generator(device=device).manual_seed(seed)
    v = torch.linalg.qr(torch.randn(k, n, block, dtype=dtype, device=device, generator=gen)).Q
    log_bound = math.log(1.648 * math.sqrt(n)) - math.log(miss_probability) / block
    cols = 0
    while True:
        end = cols + block
        if end > basis.shape[-1]:
            basis, a_basis, ata_basis = (_doubled(t, max_cols) for t in (basis, a_basis, ata_basis))
        basis[:, :, cols:end] = v
        a_basis[:, :, cols:end] = a @ v
        # A^T (A V) as ((A V)^T A)^T: batched products with a transposed A are several times slower
        ata_basis[:, :, cols:end] = (a_basis[:, :, cols:end].transpose(-2, -1) @ a).transpose(-2, -1)
        cols = end
        if _converged(basis[:, :, :cols], ata_basis[:, :, :cols], threshold, block, rtol, log_bound):
            break
        if cols + block > max_cols:
            return torch.linalg.svd(a, full_matrices=False)
        v = _orthonormal_complement(ata_basis[:, :, cols - block : cols], basis[:, :, :cols])
    w, s, xh = torch.linalg.svd(a_basis[:, :, :cols], full_matrices=False)  # Rayleigh-Ritz: A V = W S X^T
    return w, s, xh @ basis[:, :, :cols].transpose(-2, -1)


def _doubled(buffer: Tensor, max_cols: int) -> Tensor:
    bigger = buffer.new_zeros(*buffer.shape[:-1], min(2 * buffer.shape[-1], max_cols))
    bigger[..., : buffer.shape[-1]] = buffer
    return bigger


def _converged(basis: Tensor, ata_basis: Tensor, threshold: float, block: int, rtol: float, log_bound: float) -> bool:
    """Both stopping conditions of the module docstring, for every matrix of the stack."""
    gram = basis.transpose(-2, -1) @ ata_basis  # V^T A^T A V
    lam, x = torch.linalg.eigh((gram + gram.transpose(-2, -1)) / 2)
    lam, x = lam.flip(-1).clamp_min(0), x.flip(-1)
    s = lam.sqrt()
    above = s > threshold
    if above.any():
        # ||A^T u - s v|| with v = V x, u = A v / s, is ||A^T A V x - s^2 V x|| / s
        residual = (ata_basis @ x - (basis @ x) * lam.unsqueeze(-2)).norm(dim=-2) / s.clamp_min(threshold)
        # rounding alone leaves ~ eps s_1^2 / s in this difference: more steps cannot go below it
        floor = ROUNDING_SLACK * torch.finfo(s.dtype).eps * s[:, :1] ** 2 / s.clamp_min(threshold)
        if (residual > rtol * s[:, :1] + floor)[above].any():
            return False
    found = above.sum(-1)
    if bool((found >= s.shape[-1]).any()):
        return False  # every Ritz value is above the threshold: the space is still too small
    theta = s.gather(-1, found.unsqueeze(-1)).squeeze(-1)
    eps = (1 - (theta / threshold) ** 2).clamp_min(0)
    products = s.shape[-1] // block - 1 - (found + block - 1) // block
    return bool(((2 * products - 1).clamp_min(0) * eps.sqrt() >= log_bound).all())
