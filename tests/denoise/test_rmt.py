"""The RMT denoiser on synthetic low-rank signal + Gaussian noise, against the theory it implements."""

import math

import pytest
import torch

from dpllm.denoise import partial_svd, rmt_denoise, rmt_denoise_batched, shrink, signal_from_outlier, threshold

SHAPES = [(64, 64), (64, 256), (512, 512), (2048, 512)]


def spiked(m, n, thetas, s, generator):
    """X = sum_i theta_i u_i v_i^T with random orthonormal u, v, and Y = X + s Z."""
    r = len(thetas)
    u = torch.linalg.qr(torch.randn(m, r, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=generator)).Q
    x = (u * torch.tensor(thetas)) @ v.T
    return x, x + s * torch.randn(m, n, generator=generator)


def cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def outlier(theta, s, m, n):
    return math.sqrt((theta**2 + s**2 * m) * (theta**2 + s**2 * n)) / theta


@pytest.mark.parametrize("m,n", SHAPES + [(2048, 2048)])
def test_inversion_of_the_outlier_formula_is_exact(m, n):
    s = 0.3
    crit = s * (m * n) ** 0.25
    thetas = torch.tensor([1.3, 2.0, 5.0, 40.0], dtype=torch.float64) * crit
    y = torch.tensor([outlier(float(t), s, m, n) for t in thetas], dtype=torch.float64)
    torch.testing.assert_close(signal_from_outlier(y, s, m, n), thetas, rtol=1e-9, atol=0)


@pytest.mark.parametrize("m,n,trials", [(64, 64, 200), (64, 256, 200), (512, 512, 40), (2048, 512, 20), (512, 2048, 20)])
def test_theta_estimates_within_3_percent_at_1_3x_critical(m, n, trials):
    """Median over trials of the estimate from the top singular value, spike at 1.3 s (mn)^(1/4)."""
    g = torch.Generator().manual_seed(0)
    s = 0.7
    theta = 1.3 * s * (m * n) ** 0.25
    estimates = []
    for _ in range(trials):
        _, y = spiked(m, n, [theta], s, g)
        estimates.append(float(signal_from_outlier(torch.linalg.svdvals(y)[0], s, m, n)))
    median = torch.tensor(estimates).median().item()
    assert abs(median / theta - 1) < 0.03, median / theta


@pytest.mark.parametrize("m,n", SHAPES)
def test_cosine_to_signal_improves_whenever_a_spike_clears_the_threshold(m, n):
    g = torch.Generator().manual_seed(1)
    s = 1.0
    crit = s * (m * n) ** 0.25
    cleared = 0
    for trial in range(12):
        thetas = (torch.rand(3, generator=g) * 4 + 0.8).tolist()  # 0.8x..4.8x critical
        x, y = spiked(m, n, [t * crit for t in thetas], s, g)
        out, ranks = rmt_denoise_batched(y[None], s, method="full")
        if ranks.item() > 0:
            cleared += 1
            assert cos(out[0], x) > cos(y, x), (trial, thetas)
        else:
            assert torch.equal(out[0], y)
    assert cleared >= 6  # the test exercised the denoising branch


@pytest.mark.parametrize("m,n,trials", [(256, 256, 300), (256, 1024, 100), (512, 512, 100)])
def test_pure_noise_returned_unchanged_in_99_percent_of_trials(m, n, trials):
    """At 64-128 rows, Tracy-Widom fluctuations cross kappa=1.02 in ~3% of trials (see README)."""
    g = torch.Generator().manual_seed(2)
    noise = 0.5 * torch.randn(trials, m, n, generator=g)
    out, ranks = rmt_denoise_batched(noise, 0.5, kappa=1.02, method="full")
    unchanged = (out == noise).flatten(1).all(1)
    assert torch.equal(unchanged, ranks == 0)
    assert unchanged.float().mean().item() >= 0.99


def test_shrinkage_matches_theory_for_one_spike():
    """theta c_u c_v from the formulas, and the rebuilt matrix aligned with the signal as predicted."""
    g = torch.Generator().manual_seed(3)
    m, n, s = 1024, 512, 1.0
    theta = 3.0 * s * (m * n) ** 0.25
    a, b = s * s * m, s * s * n
    cu2 = (1 - a * b / theta**4) / (1 + a / theta**2)
    cv2 = (1 - a * b / theta**4) / (1 + b / theta**2)
    norms, cosines = [], []
    for _ in range(8):
        x, y = spiked(m, n, [theta], s, g)
        out = rmt_denoise(y, s, norm_correction="none")
        norms.append(out.norm().item())
        cosines.append(cos(out, x))
    # mean over trials: finite-size fluctuations of the outlier average out
    assert sum(norms) / 8 == pytest.approx(theta * math.sqrt(cu2 * cv2), rel=0.015)
    # the rank-1 estimate's cosine with the signal is c_u c_v
    assert sum(cosines) / 8 == pytest.approx(math.sqrt(cu2 * cv2), abs=0.01)


@pytest.mark.parametrize("correction", ["noisy", "none", "estimate"])
def test_scale_equivariance(correction):
    g = torch.Generator().manual_seed(4)
    _, y = spiked(300, 200, [200.0, 90.0], 1.0, g)
    y = y.double()
    base = rmt_denoise(y, 1.0, norm_correction=correction)
    for a in (1e-3, 7.0):
        torch.testing.assert_close(rmt_denoise(a * y, a * 1.0, norm_correction=correction), a * base, rtol=1e-10, atol=1e-12)


def test_norm_corrections():
    g = torch.Generator().manual_seed(5)
    m, n, s = 400, 300, 1.0
    x, y = spiked(m, n, [150.0, 80.0], s, g)
    y = y.double()
    assert rmt_denoise(y, s, norm_correction="noisy").norm().item() == pytest.approx(y.norm().item(), rel=1e-12)
    est = math.sqrt(max(y.norm().item() ** 2 - s * s * m * n, 0))
    assert rmt_denoise(y, s, norm_correction="estimate").norm().item() == pytest.approx(est, rel=1e-12)
    assert est == pytest.approx(x.norm().item(), rel=0.1)  # the estimate is close to the clean norm


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(6)
    stack = torch.stack([spiked(96, 64, [t], 1.0, g)[1] for t in (5.0, 40.0, 80.0)]).double()
    out, ranks = rmt_denoise_batched(stack, 1.0, method="full")
    for i in range(3):
        torch.testing.assert_close(out[i], rmt_denoise(stack[i], 1.0), rtol=1e-12, atol=1e-12)
    assert ranks.tolist() == [0, 1, 1]


@pytest.mark.parametrize("m,n", [(512, 512), (1024, 256), (256, 1024), (2048, 512)])
def test_partial_svd_matches_full(m, n):
    g = torch.Generator().manual_seed(7)
    crit = (m * n) ** 0.25
    stack = torch.stack([spiked(m, n, [1.5 * crit, 3 * crit, 10 * crit], 1.0, g)[1] for _ in range(2)])
    stack = torch.cat([stack, torch.randn(1, m, n, generator=g)])  # and a pure-noise matrix
    full, rf = rmt_denoise_batched(stack, 1.0, method="full")
    part, rp = rmt_denoise_batched(stack, 1.0, method="partial")
    assert torch.equal(rf, rp) and rf[-1].item() == 0
    assert ((part - full).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1)).max().item() < 1e-4


def test_partial_finds_many_spikes_growing_its_krylov_space(monkeypatch):
    monkeypatch.setattr(partial_svd, "INITIAL_BLOCKS", 2)  # room for 16 vectors: grown several times
    g = torch.Generator().manual_seed(8)
    m = n = 512
    crit = (m * n) ** 0.25
    thetas = (torch.linspace(2, 12, 30) * crit).tolist()  # 30 spikes: more than 16 vectors hold
    _, y = spiked(m, n, thetas, 1.0, g)
    full, rf = rmt_denoise_batched(y[None], 1.0, method="full")
    part, rp = rmt_denoise_batched(y[None], 1.0, method="partial")
    assert rf.item() == rp.item() == 30
    assert ((part - full).norm() / full.norm()).item() < 1e-4


@pytest.mark.parametrize("m,n", [(256, 256), (768, 256), (256, 1024)])
def test_partial_agrees_with_full_when_a_spike_sits_at_the_threshold(m, n):
    """The hard case for an iterative SVD: an outlier within a few percent of the threshold, on
    either side, must be found (or not) exactly as the full SVD finds it."""
    g = torch.Generator().manual_seed(10)
    tau = threshold(1.0, m, n)
    for position in torch.linspace(0.99, 1.05, 16).tolist():
        theta = signal_from_outlier(torch.tensor(position * tau, dtype=torch.float64), 1.0, m, n).item()
        _, y = spiked(m, n, [theta], 1.0, g)
        full, rf = rmt_denoise_batched(y[None], 1.0, method="full")
        part, rp = rmt_denoise_batched(y[None], 1.0, method="partial")
        assert rf.item() == rp.item(), position
        assert ((part - full).norm() / full.norm()).item() < 1e-4


def test_partial_converges_for_a_wide_range_of_spikes(monkeypatch):
    """In fp32, a top spike 1000x the critical value leaves a rounding floor in the residuals of the
    small ones; the iteration must stop there (not fall back to a full SVD) and still agree."""
    g = torch.Generator().manual_seed(11)
    m, n = 768, 512
    crit = (m * n) ** 0.25
    _, y = spiked(m, n, [1000 * crit, 3 * crit, 1.5 * crit], 1.0, g)
    full, rf = rmt_denoise_batched(y[None], 1.0, method="full")
    shapes = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **kw: shapes.append(tuple(a.shape)) or svd(a, **kw))
    part, rp = rmt_denoise_batched(y[None], 1.0, method="partial")
    assert rf.item() == rp.item() == 3
    assert ((part - full).norm() / full.norm()).item() < 1e-4
    assert shapes and all(shape[-1] < n // 2 for shape in shapes)  # only the small Rayleigh-Ritz SVD ran


@pytest.mark.parametrize(
    "matrix",
    [torch.zeros(512, 512), torch.ones(600, 300), torch.randn(512, 5) @ torch.randn(5, 400)],
    ids=["zero", "rank1", "rank5"],
)
def test_partial_handles_exhausted_krylov_spaces(matrix):
    """A rank below the block size leaves nothing new to explore after one step."""
    s = 1e-3
    full, rf = rmt_denoise_batched(matrix[None], s, method="full")
    part, rp = rmt_denoise_batched(matrix[None], s, method="partial")
    assert torch.isfinite(part).all() and rf.item() == rp.item()
    assert (part - full).norm() <= 1e-4 * full.norm() + 1e-6


@pytest.mark.parametrize(
    "matrix",
    [
        torch.zeros(32, 16),
        torch.ones(40, 30),  # rank 1
        torch.randn(50, 3) @ torch.randn(3, 60),  # rank deficient
        torch.randn(1, 500),
        torch.randn(4000, 2),
        torch.randn(3, 5000),
    ],
    ids=["zero", "rank1", "rank3", "1xn", "tall", "wide"],
)
def test_degenerate_matrices_give_no_nan(matrix):
    for s in (0.0, 1e-3, 1.0):
        for correction in ("noisy", "none", "estimate"):
            out = rmt_denoise(matrix, s, norm_correction=correction)
            assert torch.isfinite(out).all() and out.shape == matrix.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(9)
    x, y = spiked(256, 128, [300.0], 1.0, g)
    out = rmt_denoise(y.to(dtype), 1.0)
    ref = rmt_denoise(y.to(dtype).float(), 1.0)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.to(dtype).float())
    assert cos(out.float(), x) > cos(y, x)


def test_shrink_is_zero_at_or_below_the_bulk_edge():
    m, n, s = 100, 50, 1.0
    edge = s * (math.sqrt(m) + math.sqrt(n))
    vals = shrink(torch.tensor([0.0, edge * 0.5, edge]), s, m, n)
    assert torch.all(vals.abs() < 1e-3 * edge)


def test_bad_arguments():
    y = torch.randn(8, 8)
    with pytest.raises(ValueError, match="noise_std"):
        rmt_denoise(y, -1.0)
    with pytest.raises(ValueError, match="kappa"):
        rmt_denoise(y, 1.0, kappa=0)
    with pytest.raises(ValueError, match="norm_correction"):
        rmt_denoise(y, 1.0, norm_correction="max")
    with pytest.raises(ValueError, match=r"\(m, n\)"):
        rmt_denoise(torch.randn(2, 3, 4), 1.0)
    assert threshold(2.0, 16, 9, kappa=1.0) == pytest.approx(14.0)
