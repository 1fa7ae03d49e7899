"""The denoise stage inside the private step, checked against the pure denoiser applied by hand."""

import pytest
import torch

from dpllm.denoise import rmt_denoise
from dpllm.denoise.gradient import DEFAULT_INCLUDE, select
from dpllm.lm import forward_per_sample_loss
from dpllm.privacy.noise import GaussianNoise
from tests.conftest import tiny_batch, tiny_model
from tests.privacy.reference import clipped_reference
from tests.steps.test_private import make_step


def test_default_selection_is_attention_and_mlp_projections_only():
    model = tiny_model("qwen2", tied=False)
    names = select(dict(model.named_parameters()), DEFAULT_INCLUDE)
    assert len(names) == 2 * 7
    assert all(n.endswith("proj.weight") for n in names)
    assert not any("embed" in n or "lm_head" in n or "norm" in n or "bias" in n for n in names)


@pytest.mark.parametrize("correction", ["noisy", "estimate"])
def test_update_is_denoised_noisy_sum_over_expected_batch(correction):
    # Small noise relative to the signal, so several matrices have spikes above the bulk.
    model = tiny_model("llama", tied=True, dtype=torch.float64, hidden=64, vocab=128)
    batch = tiny_batch(vocab=128, lengths=(12,) * 8)
    C, sigma, expected = 5.0, 0.002, 8.0
    _, ref = clipped_reference(model, batch, C)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = make_step(model, sigma=sigma, C=C, expected=expected, denoiser_options=dict(norm_correction=correction, method="full"))
    step.clip_and_accumulate(forward_per_sample_loss(model, batch))
    stats = step.step()
    noise = GaussianNoise(sigma, C, seed=11)
    denoised_names = set(step.denoiser.names)
    changed = 0
    for name, p in model.named_parameters():
        noisy = ref[name] + noise.sample(0, name, p)
        target = rmt_denoise(noisy, sigma * C, norm_correction=correction) if name in denoised_names else noisy
        changed += name in denoised_names and not torch.equal(target, noisy)
        torch.testing.assert_close(p.detach() - before[name], -target / expected, rtol=1e-7, atol=1e-12)
    assert changed > 0 and stats["denoised_fraction"] == changed / len(denoised_names)
    assert stats["mean_kept_rank"] >= 1


def test_diagnostics_report_cosine_gain():
    model = tiny_model("llama", tied=True, dtype=torch.float64, hidden=64, vocab=128)
    batch = tiny_batch(vocab=128, lengths=(12,) * 8)
    step = make_step(model, sigma=0.002, C=5.0, expected=8.0, denoiser_options=dict(method="full"), diagnostics=True)
    step.clip_and_accumulate(forward_per_sample_loss(model, batch))
    stats = step.step()
    assert set(stats["cos_gain_layers"]) == set(step.denoiser.names)
    assert stats["cos_gain"] > 0  # with this little noise, denoising helps


def test_denoise_every_k_steps_and_bad_values():
    model = tiny_model("llama", dtype=torch.float64)
    step = make_step(model, denoiser_options={}, denoise_every=2)
    logs = [step.step() for _ in range(4)]
    assert ["denoised_fraction" in s for s in logs] == [True, False, True, False]
    late = make_step(model, denoiser_options={}, denoise_every=2, denoise_start=3)
    logs = [late.step() for _ in range(6)]
    assert ["denoised_fraction" in s for s in logs] == [False, False, False, True, False, True]
    with pytest.raises(ValueError, match="no 2-D parameter"):
        make_step(model, denoiser_options=dict(include=["*nothing*"]))
    with pytest.raises(ValueError, match="denoise_every"):
        make_step(model, denoiser_options={}, denoise_every=0)
    with pytest.raises(ValueError, match="denoise_start"):
        make_step(model, denoiser_options={}, denoise_start=-1)
