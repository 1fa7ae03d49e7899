"""The sharded private step on 1 and 2 gloo processes (CPU), against single-process references."""

import math

import pytest
import torch

from dpllm.denoise.gradient import GradientDenoiser
from dpllm.distributed import assign_owners
from dpllm.steps import ShardedPrivateStep
from dpllm.distributed.local import run_on_ranks
from dpllm.lm import forward_per_sample_loss
from dpllm.privacy.accountant import PrivacyAccountant
from dpllm.privacy.noise import GaussianNoise
from tests.conftest import tiny_batch, tiny_model

SIGMA, C, B = 0.7, 1.3, 32.0


def _step(env, model, denoise=None, lr=1.0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return ShardedPrivateStep(
        model,
        opt,
        env=env,
        max_grad_norm=C,
        noise=GaussianNoise(SIGMA, C, seed=11),
        noise_multiplier=SIGMA,
        sample_rate=0.5,
        expected_batch_size=B,
        accountant=PrivacyAccountant(1e-5),
        denoiser_options=denoise,
    )


def _zero_signal_update(env):
    """Per-sample losses that do not depend on the parameters: the update is the noise alone."""
    model = tiny_model("llama", dtype=torch.float64, seed=0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    step = _step(env, model)
    batch = tiny_batch(lengths=(9, 7, 5, 9))
    share = {k: v[env.rank :: env.world_size] for k, v in batch.items()}
    step.clip_and_accumulate(forward_per_sample_loss(model, share) * 0.0)
    step.step()
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_zero_signal_update_is_one_noise_draw_on_one_and_two_processes():
    one = run_on_ranks(1, _zero_signal_update)[0]
    two = run_on_ranks(2, _zero_signal_update)
    assert torch.equal(two[0], two[1])  # replicated parameters stay identical
    assert torch.allclose(one, two[0], rtol=0, atol=1e-15)  # the same noise, added once
    n = one.numel()
    var = (SIGMA * C / B) ** 2
    z = (float((two[0] ** 2).sum()) / var - n) / math.sqrt(2 * n)  # chi-square with n degrees of freedom
    assert abs(z) < 5, z
    z_twice = (float((two[0] ** 2).sum()) / (2 * var) - n) / math.sqrt(2 * n)
    assert z_twice < -50  # noise added on both ranks would have doubled the variance


def _denoise_sharded(env, grads):
    model = tiny_model("llama", dtype=torch.float64, seed=0, hidden=64, vocab=128)
    step = _step(env, model, denoise={"method": "full"})
    for name in step.params:  # the ranks' partial sums add up to the full gradient
        step.accumulate(name, grads[name] / env.world_size)
    stats = step.denoise()
    step.average()
    step.hand_over()
    owned = sorted(n for n in step.denoiser.names) if step.denoiser else []
    return {"grads": {n: p.grad.clone() for n, p in step.params.items()}, "stats": stats, "owned": owned}


@pytest.mark.slow
def test_sharded_denoising_equals_single_process_denoising():
    model = tiny_model("llama", dtype=torch.float64, seed=0, hidden=64, vocab=128)
    g = torch.Generator().manual_seed(5)
    s = SIGMA * C
    grads = {}
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * s
        if p.dim() == 2:  # a rank-2 signal well above the bulk edge
            u = torch.randn(p.shape[0], 2, generator=g, dtype=torch.float64)
            v = torch.randn(2, p.shape[1], generator=g, dtype=torch.float64)
            noise = noise + 3 * s * (p.shape[0] * p.shape[1]) ** 0.25 * (u @ v) / (u.norm() * v.norm()) * 2
        grads[name] = noise
    ref_params = dict(model.named_parameters())
    for name, p in ref_params.items():
        p.grad = grads[name].clone()
    reference = GradientDenoiser(ref_params, method="full")
    ref_stats = reference(s)
    two = run_on_ranks(2, _denoise_sharded, grads)
    assert two[0]["owned"] and two[1]["owned"] and not set(two[0]["owned"]) & set(two[1]["owned"])
    assert sorted(two[0]["owned"] + two[1]["owned"]) == sorted(reference.names)
    for name, p in ref_params.items():
        torch.testing.assert_close(two[0]["grads"][name], p.grad / B, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(two[1]["grads"][name], p.grad / B, rtol=1e-10, atol=1e-14)
    assert ref_stats.denoised > 0
    assert two[0]["stats"]["denoised_fraction"] == pytest.approx(ref_stats.denoised / ref_stats.matrices)


def test_owners_cover_every_parameter_and_balance_the_svd_work():
    shapes = {f"l{i}.q": (64, 64) for i in range(4)} | {f"l{i}.up": (128, 64) for i in range(4)} | {"emb": (1000, 64)}
    denoised = {n for n in shapes if n != "emb"}
    owners = assign_owners(shapes, denoised, 2)
    assert set(owners) == set(shapes) and set(owners.values()) == {0, 1}
    svd = [sum(a * b * min(a, b) for n, (a, b) in shapes.items() if n in denoised and owners[n] == r) for r in (0, 1)]
    assert svd[0] == svd[1]  # four of each shape: a perfect split exists and greedy finds it
    assert assign_owners(shapes, denoised, 2) == owners  # every rank computes the same assignment
    assert set(assign_owners(shapes, denoised, 1).values()) == {0}


def _one_trainable_tensor(env):
    """One trainable matrix: every rank computes the same ownership, so on two processes every rank
    refuses (none hangs waiting for the other)."""
    model = tiny_model("llama", dtype=torch.float64, seed=0)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("layers.0.self_attn.q_proj.weight"))
    try:
        _step(env, model)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.slow
def test_more_processes_than_trainable_tensors_is_refused_on_every_rank():
    assert run_on_ranks(1, _one_trainable_tensor) == [None]
    for message in run_on_ranks(2, _one_trainable_tensor):
        assert "2 processes but only 1 trainable parameter tensor(s)" in message and "ranks [1] would own nothing" in message
