"""Random-matrix denoising of a noisy gradient matrix (spiked model, optimal SVD shrinkage).

Model: Y = X + s Z with X (m x n) of low rank and Z i.i.d. N(0, 1). The singular values of
s Z fill a bulk up to s (sqrt(m) + sqrt(n)). A signal singular value theta above the critical
value s (m n)^(1/4) shows up as an outlier

    y = sqrt((theta^2 + s^2 m)(theta^2 + s^2 n)) / theta,

and the outlier's singular vectors u (in R^m) and v align with the true ones by

    c_u^2 = (1 - s^4 m n / theta^4) / (1 + s^2 m / theta^2),
    c_v^2 = (1 - s^4 m n / theta^4) / (1 + s^2 n / theta^2).

Every y_i above the threshold kappa s (sqrt(m) + sqrt(n)) is kept: theta_i is recovered by
inverting the first formula and the component is shrunk to theta_i c_u c_v, the
Frobenius-optimal shrinker (Benaych-Georges & Nadakuditi 2012; Gavish & Donoho 2017).
Below the threshold nothing is distinguishable from noise and the input is returned as it is.
Everything is a function of (Y, s): it post-processes the private gradient and costs no privacy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORM_CORRECTIONS = ("noisy", "none", "estimate")
DEFAULT_KAPPA = 1.02


def threshold(noise_std: float, m: int, n: int, kappa: float = DEFAULT_KAPPA) -> float:
    """The bulk-edge threshold kappa s (sqrt(m) + sqrt(n))."""
    return kappa * noise_std * (math.sqrt(m) + math.sqrt(n))


def signal_from_outlier(y: Tensor, noise_std: float, m: int, n: int) -> Tensor:
    """theta with sqrt((theta^2 + a)(theta^2 + b)) / theta = y (a = s^2 m, b = s^2 n), the larger root."""
    a, b = noise_std**2 * m, noise_std**2 * n
    d = y * y - a - b
    disc = (d * d - 4 * a * b).clamp_min(0)
    return ((d + disc.sqrt()) / 2).clamp_min(0).sqrt()


def shrink(y: Tensor, noise_std: float, m: int, n: int) -> Tensor:
    """theta c_u c_v for outliers y (entries at or below the bulk edge shrink to 0)."""
    theta = signal_from_outlier(y, noise_std, m, n)
    t2 = theta * theta
    safe = t2.clamp_min(torch.finfo(t2.dtype).tiny)
    a, b = noise_std**2 * m, noise_std**2 * n
    r = (a * b) / (safe * safe)
    cu2 = ((1 - r) / (1 + a / safe)).clamp_min(0)
    cv2 = ((1 - r) / (1 + b / safe)).clamp_min(0)
    return torch.where(t2 > 0, theta * (cu2 * cv2).sqrt(), torch.zeros_like(theta))


def _check(noise_std: float, kappa: float, norm_correction: str) -> None:
    if not noise_std >= 0 or math.isinf(noise_std):
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std}")
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    if norm_correction not in NORM_CORRECTIONS:
        raise ValueError(f"norm_correction must be one of {NORM_CORRECTIONS}, got {norm_correction!r}")


def correct_norm(out: Tensor, noisy: Tensor, noise_std: float, norm_correction: str) -> Tensor:
    """Rescale the rebuilt matrices (batched, (..., m, n)) to the chosen Frobenius norm."""
    if norm_correction == "none":
        return out
    m, n = noisy.shape[-2:]
    noisy_sq = noisy.pow(2).sum((-2, -1), keepdim=True)
    if norm_correction == "noisy":
        target = noisy_sq.sqrt()
    else:  # "estimate": unbiased estimate of the clean norm, E||Y||^2 = ||X||^2 + s^2 m n
        target = (noisy_sq - noise_std**2 * m * n).clamp_min(0).sqrt()
    current = out.pow(2).sum((-2, -1), keepdim=True).sqrt()
    scale = torch.where(current > 0, target / current.clamp_min(torch.finfo(out.dtype).tiny), torch.zeros_like(current))
    return out * scale


def denoise_from_svd(
    noisy: Tensor, u: Tensor, s: Tensor, vh: Tensor, noise_std: float, kappa: float, norm_correction: str
) -> tuple[Tensor, Tensor]:
    """Denoise a batch (k, m, n) given (possibly truncated) SVD factors; returns (out, kept ranks).

    Matrices whose top singular value is below the threshold come back unchanged.
    """
    m, n = noisy.shape[-2:]
    tau = threshold(noise_std, m, n, kappa)
    keep = s > tau
    values = torch.where(keep, shrink(s, noise_std, m, n), torch.zeros_like(s))
    rebuilt = (u * values.unsqueeze(-2)) @ vh
    rebuilt = correct_norm(rebuilt, noisy, noise_std, norm_correction)
    ranks = keep.sum(-1)
    out = torch.where((ranks > 0).view(-1, 1, 1), rebuilt, noisy)
    return out, ranks


def rmt_denoise(noisy: Tensor, noise_std: float, kappa: float = DEFAULT_KAPPA, norm_correction: str = "noisy") -> Tensor:
    """Denoise one (m, n) matrix whose entries carry N(0, noise_std^2) noise (full SVD)."""
    if noisy.dim() != 2:
        raise ValueError(f"rmt_denoise takes an (m, n) matrix, got shape {tuple(noisy.shape)}")
    out, _ = rmt_denoise_batched(noisy.unsqueeze(0), noise_std, kappa, norm_correction, method="full")
    return out[0]


def rmt_denoise_batched(
    noisy: Tensor,
    noise_std: float,
    kappa: float = DEFAULT_KAPPA,
    norm_correction: str = "noisy",
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Denoise a stack (k, m, n) of same-shape matrices with one batched SVD.

    ``method``: "full" (torch.linalg.svd), "partial" (block Lanczos, run until every singular
    value above the threshold has converged and none can be missing), or "auto" (partial
    from a few hundred rows and columns, where it is faster). Returns (denoised, kept
    ranks); computed in fp32 (fp64 for fp64 inputs) and returned in the input dtype.
    """
    _check(noise_std, kappa, norm_correction)
    if noisy.dim() != 3:
        raise ValueError(f"expected a (k, m, n) stack, got shape {tuple(noisy.shape)}")
    if noise_std == 0 or noisy.numel() == 0:
        return noisy.clone(), torch.zeros(noisy.shape[0], dtype=torch.long, device=noisy.device)
    from dpllm.denoise.partial_svd import partial_pays, top_singular_triplets

    work = noisy.to(torch.promote_types(noisy.dtype, torch.float32))
    m, n = work.shape[-2:]
    if method == "auto":
        method = "partial" if partial_pays(m, n) else "full"
    if method == "full":
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    elif method == "partial":
        u, s, vh = top_singular_triplets(work, threshold(noise_std, m, n, kappa))
    else:
        raise ValueError(f"method must be 'full', 'partial' or 'auto', got {method!r}")
    out, ranks = denoise_from_svd(work, u, s, vh, noise_std, kappa, norm_correction)
    return out.to(noisy.dtype), ranks
