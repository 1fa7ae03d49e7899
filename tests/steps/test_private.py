"""The private step's stages: exact noisy gradient, noise once per logical batch, accounting."""

import pytest
import torch
from scipy import stats

from dpllm.lm import forward_per_sample_loss
from dpllm.privacy.accountant import PrivacyAccountant
from dpllm.privacy.accounting import compute_epsilon
from dpllm.privacy.noise import GaussianNoise
from dpllm.steps.private import PrivateStep
from tests.conftest import tiny_batch, tiny_model
from tests.privacy.reference import clipped_reference


def make_step(model, sigma=0.7, C=0.3, q=0.1, expected=4.0, seed=11, lr=1.0, **options):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return PrivateStep(
        model,
        opt,
        max_grad_norm=C,
        noise=GaussianNoise(sigma, C, seed=seed),
        noise_multiplier=sigma,
        sample_rate=q,
        expected_batch_size=expected,
        accountant=PrivacyAccountant(delta=1e-5),
        **options,
    )


def test_update_is_clipped_sum_plus_noise_over_expected_batch():
    model = tiny_model("qwen2", tied=True, dtype=torch.float64)
    batch = tiny_batch()
    C, sigma, expected = 0.3, 0.7, 5.0
    _, ref = clipped_reference(model, batch, C)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = make_step(model, sigma=sigma, C=C, expected=expected)
    step.clip_and_accumulate(forward_per_sample_loss(model, batch))
    step.step()
    independent = GaussianNoise(sigma, C, seed=11)
    for name, p in model.named_parameters():
        noise = independent.sample(0, name, p)
        expected_update = -(ref[name] + noise) / expected  # SGD, lr 1
        torch.testing.assert_close(p.detach() - before[name], expected_update, rtol=1e-7, atol=1e-10)


def test_micro_batching_gives_the_same_update():
    """Gradient accumulation over micro-batches adds noise once, exactly as one big batch does."""
    batch = tiny_batch()
    results = []
    for splits in ([slice(0, 4)], [slice(0, 1), slice(1, 3), slice(3, 4)]):
        model = tiny_model("llama", tied=True, dtype=torch.float64)
        step = make_step(model)
        for part in splits:
            step.clip_and_accumulate(forward_per_sample_loss(model, {k: v[part] for k, v in batch.items()}))
        step.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_zero_signal_update_is_one_noise_draw(micro_batches):
    """With losses that do not depend on the parameters, the update is N(0, (sigma C / B)^2)."""
    model = tiny_model("llama", tied=False, dtype=torch.float64, hidden=64, vocab=256)
    sigma, C, B = 1.3, 0.5, 8.0
    step = make_step(model, sigma=sigma, C=C, expected=B, seed=123)
    batch = tiny_batch(vocab=256, lengths=(6,) * 8)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    for part in torch.arange(8).chunk(micro_batches):
        sub = {k: v[part] for k, v in batch.items()}
        step.clip_and_accumulate(forward_per_sample_loss(model, sub) * 0.0)
    step.step()
    update = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    n = update.numel()
    assert n > 100_000
    chi2 = float((update / (sigma * C / B)).pow(2).sum())
    # two-sided 99.9% interval of chi-square with n degrees of freedom
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], n)
    assert lo < chi2 < hi, (chi2, n)
    # noise twice (or scaled by micro-batches) would be far outside: chi2 ~ 2n
    assert hi < 1.1 * n


def test_empty_logical_batch_is_a_noise_only_step():
    model = tiny_model("llama", dtype=torch.float64)
    step = make_step(model, expected=4.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_ = step.step()  # no micro-batch at all
    independent = GaussianNoise(0.7, 0.3, seed=11)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[name], -independent.sample(0, name, p) / 4.0)
    assert stats_["samples"] == 0 and step.accountant.steps == 1


def test_accountant_counts_every_step():
    model = tiny_model("llama")
    step = make_step(model, sigma=0.9, q=0.05)
    batch = tiny_batch()
    for _ in range(3):
        step.clip_and_accumulate(forward_per_sample_loss(model, batch))
        step.step()
    assert step.accountant.epsilon() == pytest.approx(compute_epsilon(0.9, 0.05, 3, 1e-5), rel=1e-9)


def test_nan_sample_is_dropped_and_step_still_accounted():
    model = tiny_model("llama", dtype=torch.float64)
    step = make_step(model)
    loss = forward_per_sample_loss(model, tiny_batch())
    loss = torch.cat([loss[:2], loss[2:3] * float("inf"), loss[3:]])
    step.clip_and_accumulate(loss)
    s = step.step()
    assert s["dropped_samples"] == 1 and s["samples"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert step.accountant.steps == 1


def test_private_step_requires_noise():
    with pytest.raises(ValueError, match="noise_multiplier"):
        make_step(tiny_model("llama"), sigma=0.0)


def test_noise_that_disagrees_with_the_accounted_sigma_is_refused():
    model = tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="accountant would report"):
        PrivateStep(
            model,
            opt,
            max_grad_norm=1.0,
            noise=GaussianNoise(0.5, 1.0, seed=0),
            noise_multiplier=1.0,
            sample_rate=0.1,
            expected_batch_size=4.0,
            accountant=PrivacyAccountant(delta=1e-5),
        )
