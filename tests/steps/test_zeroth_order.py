"""The DP zeroth-order step: keyed directions, central differences clipped to [-C, C], noise once,
accounting of one subsampled Gaussian per direction; checked against torch.func gradients."""

import pytest
import torch
from scipy import stats

from dpllm.distributed.env import DistEnv
from dpllm.lm import forward_per_sample_loss
from dpllm.privacy.accountant import PrivacyAccountant
from dpllm.privacy.noise import GaussianNoise
from dpllm.steps import MicroBatch, ZerothOrderStep
from dpllm.steps.zeroth_order import PIECE, Directions, StageSchedule
from tests.conftest import tiny_batch, tiny_model
from tests.privacy.reference import per_sample_grads


def make_step(model, C=0.5, sigma=0.8, expected=4.0, directions=1, mu=1e-4, lr=0.1, seed=5, masks=None, **stages):
    return ZerothOrderStep(
        model, env=DistEnv(), max_grad_norm=C, noise=GaussianNoise(sigma, C, seed=seed), noise_multiplier=sigma,
        sample_rate=0.1, expected_batch_size=expected, accountant=PrivacyAccountant(delta=1e-5),
        directions=directions, schedule=StageSchedule(lr=lr, mu=mu, **stages), direction_seed=17, masks=masks,
    )


def direction(model, step: int, j: int, seed: int = 17) -> dict:
    """z of (step, direction j) for every trainable parameter, drawn whole into zeros."""
    z = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    Directions(seed).add_(step, j, [(n, t.view(-1), 0, t.numel()) for n, t in z.items()], 1.0)
    return z


def forward_of(model):
    return lambda batch: forward_per_sample_loss(model, batch)


def noisy_sum_from_update(model, before: dict, step: ZerothOrderStep, z: dict) -> float:
    """The step's noised sum, read back from theta_after - theta_before = -lr * sum / expected * z."""
    dot = sum(float(((p.detach() - before[n]) * z[n]).sum()) for n, p in model.named_parameters() if n in z)
    norm2 = sum(float(t.pow(2).sum()) for t in z.values())
    return -dot / (step.lr * norm2) * step.expected_batch_size


def test_a_shard_draws_exactly_the_entries_of_a_whole_copy():
    numel = 3 * PIECE + 123
    dirs = Directions(3)
    whole = torch.zeros(numel)
    dirs.add_(4, 1, [("w", whole, 0, numel)], 1.0)
    cuts = [0, 5000, PIECE + 7, 2 * PIECE, numel]  # mid-piece, on a piece boundary, the short last piece
    pieces = [torch.zeros(b - a) for a, b in zip(cuts, cuts[1:])]
    dirs.add_(4, 1, [("w", t, a, numel) for t, a in zip(pieces, cuts)], 1.0)
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=0, atol=0)
    assert stats.kstest(whole.numpy(), "norm").pvalue > 1e-3  # standard normal entries
    other = torch.zeros(numel)
    dirs.add_(5, 1, [("w", other, 0, numel)], 1.0)  # another step: an independent direction
    assert abs(float(torch.corrcoef(torch.stack([whole, other]))[0, 1])) < 0.03


def test_estimate_is_the_clipped_sum_of_directional_derivatives_plus_noise():
    model = tiny_model("llama", tied=True, dtype=torch.float64)
    batch = tiny_batch()
    z = direction(model, 0, 0)
    jac = per_sample_grads(model, batch)  # independent: torch.func per-sample gradients
    derivative = sum((jac[n].reshape(jac[n].shape[0], -1) @ z[n].reshape(-1)) for n in z)
    middle = derivative.abs().sort().values[1:3]
    C = float(middle.mean())  # two samples clipped, two not
    # Central differences are exact to O((mu |z|)^2); the model's losses to about 1e-9
    step = make_step(model, C=C, mu=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step.run([[MicroBatch(batch, padding=False)]], forward_of(model))
    for n, p in model.named_parameters():  # theta + mu z - 2 mu z + mu z: back where it was
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-12)
    step.step()
    noise = float(GaussianNoise(0.8, C, seed=5).sample(0, "zeroth-order", torch.zeros(1, dtype=torch.float64))[0])
    expected = float(derivative.clamp(-C, C).sum()) + noise
    assert abs(noisy_sum_from_update(model, before, step, z) - expected) < 1e-3
    assert step.accountant.history == [[0.8, 0.1, 1]]


def test_one_sample_moves_the_noised_sum_by_at_most_C():
    """Add/remove adjacency: the same seeds, with and without one extra row whose directional
    derivative far exceeds C; the noised sums differ by that row's clipped scalar, C at most."""
    C = 0.05
    batch = tiny_batch(lengths=(10, 7, 10))
    extra = tiny_batch(lengths=(10, 7, 10, 9), seed=1)
    sums = []
    for b in (batch, extra):
        model = tiny_model("llama", dtype=torch.float64)
        step = make_step(model, C=C, mu=1e-3)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step.run([[MicroBatch(b, padding=False)]], forward_of(model))
        stats_ = step.step()
        sums.append(noisy_sum_from_update(model, before, step, direction(model, 0, 0)))
    assert stats_["clipped_fraction"] == 1.0  # every scalar, the extra row's included, was clipped
    assert abs(sums[1] - sums[0]) <= C * (1 + 1e-6)
    assert abs(sums[1] - sums[0]) > 0.99 * C  # and the row did count, clipped to C


def test_non_finite_scalars_count_zero_and_are_reported():
    model = tiny_model("llama", dtype=torch.float64)
    batch = tiny_batch()

    def forward(b):
        losses = forward_per_sample_loss(model, b)
        return torch.cat([losses[:1] * float("nan"), losses[1:]])

    step = make_step(model, C=0.5)
    step.run([[MicroBatch(batch, padding=False)]], forward)
    stats_ = step.step()
    assert stats_["dropped_samples"] == 1 and stats_["samples"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_each_direction_is_one_accounted_mechanism_on_its_own_sample():
    model = tiny_model("llama", dtype=torch.float64)
    step = make_step(model, directions=3)
    draws = [[MicroBatch(tiny_batch(seed=s), padding=False)] for s in (1, 2, 3)]
    for _ in range(2):
        step.run(draws, forward_of(model))
        step.step()
    assert step.accountant.history == [[0.8, 0.1, 6]]
    with pytest.raises(ValueError, match="one per direction"):
        step.run(draws[:1], forward_of(model))


def test_only_trainable_parameters_move():
    model = tiny_model("llama", dtype=torch.float64)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "embed" in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    step = make_step(model)
    step.run([[MicroBatch(tiny_batch(), padding=False)]], forward_of(model))
    step.step()
    params = dict(model.named_parameters())
    for n, value in frozen.items():
        assert torch.equal(params[n].detach(), value)
    assert any(not torch.equal(p, tiny_model("llama", dtype=torch.float64).state_dict()[n]) for n, p in params.items() if n not in frozen)


def test_stage_schedule_halves_lr_and_moves_mu_geometrically_per_stage():
    """Hand-worked: stages of 2, 4 and then the rest of the steps."""
    schedule = StageSchedule(lr=0.1, mu=1e-2, stages=3, first_steps=2, mu_end=1e-4)
    assert [schedule.stage(t) for t in range(8)] + [schedule.stage(1000)] == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    for t, lr, mu in ((0, 0.1, 1e-2), (2, 0.05, 1e-3), (5, 0.05, 1e-3), (6, 0.025, 1e-4), (1000, 0.025, 1e-4)):
        assert schedule.lr_at(t) == pytest.approx(lr, rel=1e-12) and schedule.mu_at(t) == pytest.approx(mu, rel=1e-12)
    plain = StageSchedule(lr=0.1, mu=1e-3)  # DPZero: one stage, constant
    assert {(plain.lr_at(t), plain.mu_at(t)) for t in range(0, 10**6, 997)} == {(0.1, 1e-3)}
    with pytest.raises(ValueError, match="first_steps >= 1"):
        StageSchedule(lr=0.1, mu=1e-3, stages=2)


def test_the_step_runs_at_its_stage_s_lr_and_mu():
    """Step 1 is in the second stage: its estimate is again torch.func's clipped directional
    derivatives plus noise (central differences at the stage's mu), applied at half the lr."""
    model = tiny_model("llama", tied=True, dtype=torch.float64)
    batch = tiny_batch()
    step = make_step(model, C=10.0, mu=1e-3, lr=0.05, stages=2, first_steps=1, mu_end=1e-4)
    first = step.run([[MicroBatch(batch, padding=False)]], forward_of(model))
    stats_ = step.step()
    assert (stats_["zo_lr"], stats_["zo_mu"]) == (0.05, 1e-3) and first
    z = direction(model, 1, 0)
    jac = per_sample_grads(model, batch)
    derivative = sum((jac[n].reshape(jac[n].shape[0], -1) @ z[n].reshape(-1)) for n in z)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step.run([[MicroBatch(batch, padding=False)]], forward_of(model))
    stats_ = step.step()
    assert stats_["zo_lr"] == pytest.approx(0.025) and stats_["zo_mu"] == pytest.approx(1e-4)
    noise = float(GaussianNoise(0.8, 10.0, seed=5).sample(1, "zeroth-order", torch.zeros(1, dtype=torch.float64))[0])
    dot = sum(float(((p.detach() - before[n]) * z[n]).sum()) for n, p in model.named_parameters() if n in z)
    norm2 = sum(float(t.pow(2).sum()) for t in z.values())
    read_back = -dot / (0.025 * norm2) * step.expected_batch_size
    assert abs(read_back - (float(derivative.clamp(-10.0, 10.0).sum()) + noise)) < 1e-3


def _two_steps(env, tied: bool) -> dict:
    """Two steps on a float64 tiny Llama, each rank on its share of one batch; FSDP2 on 2 ranks."""
    from torch.distributed.tensor import DTensor

    from dpllm.distributed.fsdp import shard_from_rank0

    model = tiny_model("llama", tied=tied, dtype=torch.float64)
    if env.world_size > 1:
        shard_from_rank0(model, env, torch.device("cpu"))
    step = ZerothOrderStep(
        model, env=env, max_grad_norm=0.5, noise=GaussianNoise(0.8, 0.5, seed=5), noise_multiplier=0.8, sample_rate=0.1,
        expected_batch_size=4.0, accountant=PrivacyAccountant(delta=1e-5), directions=1,
        schedule=StageSchedule(lr=0.1, mu=1e-3), direction_seed=17, lockstep=env.world_size > 1,
    )
    batch = tiny_batch()  # equal padding width either way: each sample's loss is the same in any share
    share = {k: v[env.rank :: env.world_size] for k, v in batch.items()}
    for _ in range(2):
        step.run([[MicroBatch(share, padding=False)]], forward_of(model))
        step.step()
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fsdp2_forwards_see_the_root_unit_s_perturbation(tied):
    """FSDP2 keeps its root unit (the final norm; tied embeddings too) gathered after a forward;
    without a reshard the minus forward ran on the plus point's copy of it. 2 ranks == 1."""
    from dpllm.distributed.local import run_on_ranks

    whole = _two_steps(DistEnv(), tied)
    sharded = run_on_ranks(2, _two_steps, tied)[0]
    for n, value in whole.items():
        torch.testing.assert_close(sharded[n], value, rtol=0, atol=1e-12, msg=n)


def test_the_regulariser_pulls_towards_the_stage_s_starting_point():
    """Two runs from the same theta with the same directions and noise, with and without
    lambda: in stage 0 (steps 0 and 1) the first step's pull is zero (theta is the starting point)
    and the second's is exactly -lr lambda (theta_1 - theta_0); step 2 starts stage 1 there."""
    lam, lr = 0.5, 0.1
    runs = []
    for regularization in (0.0, lam):
        model = tiny_model("llama", dtype=torch.float64)
        step = make_step(model, C=0.5, mu=1e-3, lr=lr, stages=2, first_steps=2, regularization=regularization)
        thetas = [{n: p.detach().clone() for n, p in model.named_parameters()}]
        for t in range(3):
            step.run([[MicroBatch(tiny_batch(seed=t + 1), padding=False)]], forward_of(model))
            step.step()
            thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
        runs.append((thetas, step))
    (plain, _), (pulled, step) = runs
    for n in plain[0]:
        torch.testing.assert_close(pulled[1][n], plain[1][n], rtol=0, atol=0)
        torch.testing.assert_close(pulled[2][n] - plain[2][n], -lr * lam * (plain[1][n] - plain[0][n]), rtol=1e-9, atol=1e-15)
    # step 2 began stage 1: its starting point is theta_2 (to the rounding of the two forwards'
    # theta + mu z - 2 mu z + mu z), kept per rank for a resume
    flat = {n: t.view(-1) for n, t in pulled[2].items()}
    for ref, n in zip(step.rank_state()["reference"], flat):
        torch.testing.assert_close(ref, flat[n], rtol=0, atol=1e-15)
