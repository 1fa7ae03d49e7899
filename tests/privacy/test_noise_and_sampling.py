import math

import pytest
import torch

from dpllm.privacy.noise import GaussianNoise
from dpllm.privacy.sampling import PoissonSampler, micro_batches


def test_noise_std_and_mean():
    noise = GaussianNoise(noise_multiplier=1.5, max_grad_norm=0.4, seed=3)
    x = noise.sample(0, "w", torch.empty(200_000))
    # std of the sample std ~ std / sqrt(2n): allow 5 sigma
    assert x.std().item() == pytest.approx(0.6, abs=5 * 0.6 / math.sqrt(4e5))
    assert abs(x.mean().item()) < 5 * 0.6 / math.sqrt(2e5)


def test_noise_streams_are_keyed_by_step_and_name_and_reproducible():
    a = GaussianNoise(1.0, 1.0, seed=7)
    b = GaussianNoise(1.0, 1.0, seed=7)
    like = torch.empty(64)
    assert torch.equal(a.sample(3, "layer.weight", like), b.sample(3, "layer.weight", like))
    assert not torch.equal(a.sample(3, "layer.weight", like), a.sample(4, "layer.weight", like))
    assert not torch.equal(a.sample(3, "layer.weight", like), a.sample(3, "layer.bias", like))
    assert not torch.equal(a.sample(3, "w", like), GaussianNoise(1.0, 1.0, seed=8).sample(3, "w", like))


def test_secure_mode_seeds_from_os_and_refuses_to_save():
    a, b = GaussianNoise(1.0, 1.0, secure=True), GaussianNoise(1.0, 1.0, secure=True)
    like = torch.empty(32)
    assert not torch.equal(a.sample(0, "w", like), b.sample(0, "w", like))
    with pytest.raises(RuntimeError, match="never saved"):
        a.state_dict()
    with pytest.raises(ValueError, match="seed"):
        GaussianNoise(1.0, 1.0, seed=1, secure=True)
    with pytest.raises(ValueError, match="seed"):
        GaussianNoise(1.0, 1.0)


def test_noise_bad_arguments():
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianNoise(-0.1, 1.0, seed=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        GaussianNoise(1.0, 0.0, seed=0)


def test_poisson_sampler_inclusion_is_independent_bernoulli():
    n, q, trials = 50, 0.2, 4000
    sampler = PoissonSampler(n, q, seed=0)
    counts = torch.zeros(n)
    sizes = []
    for _ in range(trials):
        idx = sampler.sample()
        counts[idx] += 1
        sizes.append(len(idx))
    # each example's inclusion rate ~ q (binomial, 5 sigma)
    sd = math.sqrt(q * (1 - q) / trials)
    assert ((counts / trials - q).abs() < 5 * sd).all()
    # batch sizes vary like Binomial(n, q), not fixed
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.15)


def test_sampler_empty_batches_and_reproducibility():
    sampler = PoissonSampler(5, 0.01, seed=1)
    batches = [sampler.sample() for _ in range(50)]
    assert any(len(b) == 0 for b in batches)
    again = PoissonSampler(5, 0.01, seed=1)
    assert batches == [again.sample() for _ in range(50)]
    assert micro_batches([], 4) == []


def test_sampler_state_round_trip():
    a = PoissonSampler(100, 0.1, seed=5)
    a.sample()
    state = a.state_dict()
    expected = [a.sample() for _ in range(3)]
    b = PoissonSampler(100, 0.1, seed=99)
    b.load_state_dict(state)
    assert [b.sample() for _ in range(3)] == expected


def test_micro_batches_cover_in_order():
    idx = list(range(10))
    parts = micro_batches(idx, 4)
    assert [len(p) for p in parts] == [4, 4, 2] and sum(parts, []) == idx


@pytest.mark.parametrize("q", [0.0, -0.1, 1.01])
def test_sampler_bad_rate(q):
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampler(10, q, seed=0)


def test_sampler_empty_dataset():
    with pytest.raises(ValueError, match="empty dataset"):
        PoissonSampler(0, 0.1, seed=0)
