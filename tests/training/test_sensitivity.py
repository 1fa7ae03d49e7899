"""The sensitivity bound in low precision: removing one example moves the pre-noise sum by at most C.

Clipped sums are accumulated (and reduced over ranks) in fp32 whatever the parameter dtype. Had
they been added in bf16, the rounding of the sum would depend on the other samples: with this
data, accumulating each micro-batch's sum in bf16 moves it by 1.025 C when one example goes.
"""

import pytest
import torch

from dpllm.distributed import DistEnv
from dpllm.steps import ShardedPrivateStep
from dpllm.distributed.fsdp import shard_from_rank0
from dpllm.distributed.local import run_on_ranks
from dpllm.lm import collate, forward_per_sample_loss
from dpllm.privacy.accountant import PrivacyAccountant
from dpllm.privacy.noise import GaussianNoise
from dpllm.privacy.sampling import micro_batches, rank_share
from tests.conftest import tiny_model

N, LENGTH, C, REMOVED = 512, 12, 1.0, 100


def _examples() -> list[dict]:
    """Equal lengths: removing one example changes no other example's padding."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(N):
        ids = torch.randint(1, 96, (LENGTH,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def _pre_noise_sums(
    env, dtype: torch.dtype, removed: int | None, device: str = "cpu", autocast: bool = False, fsdp: bool = False
) -> dict[str, torch.Tensor]:
    """The clipped sums each owner holds before the noise (``autocast``: fp32 weights, bf16 forwards;
    ``fsdp``: sharded by FSDP2 with precision=bf16-mixed's policy, units gathered in bf16)."""
    model = tiny_model("llama", dtype=dtype, seed=0).to(device)
    step = ShardedPrivateStep(
        model, torch.optim.SGD(model.parameters(), lr=0.1), env=env, max_grad_norm=C,
        noise=GaussianNoise(1.0, C, seed=0), noise_multiplier=1.0, sample_rate=0.5, expected_batch_size=N / 2,
        accountant=PrivacyAccountant(1e-5), handover="fsdp" if fsdp else "replicated",
    )
    if fsdp:
        step.release_parameters()
        shard_from_rank0(model, env, torch.device(device), bf16_gather=True)
        step.use_sharded(model, torch.optim.SGD(model.parameters(), lr=0.1))
        gathered = _gathered_dtypes(model)
    data = _examples()
    mine = rank_share([i for i in range(N) if i != removed], env.rank, env.world_size)
    for micro in micro_batches(mine, 16):
        batch = {k: v.to(device) for k, v in collate([data[i] for i in micro], 0).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = forward_per_sample_loss(model, batch)
        step.clip_and_accumulate(loss)
    if fsdp:
        assert set(gathered) == {torch.bfloat16} and all(p.dtype == torch.float32 for p in model.parameters())
    return {name: g.cpu().clone() for name, g in step._complete_sums().items()}  # owners' sums, reduced per micro-batch


def _gathered_dtypes(model) -> list[torch.dtype]:
    """The dtype each linear layer's weight has while its forward runs (FSDP2 gathers it then)."""
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    return seen


def _distance(world_size: int, dtype: torch.dtype, device: str = "cpu", autocast: bool = False, fsdp: bool = False) -> float:
    if world_size == 1:
        full, without = (_pre_noise_sums(DistEnv(), dtype, r, device, autocast) for r in (None, REMOVED))
    else:
        full, without = (
            {k: v for rank in run_on_ranks(world_size, _pre_noise_sums, dtype, r, device, autocast, fsdp) for k, v in rank.items()}
            for r in (None, REMOVED)
        )
    assert all(v.dtype == torch.float32 for v in full.values())
    return sum(float((full[k].double() - without[k].double()).pow(2).sum()) for k in full) ** 0.5


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_one_example_moves_the_pre_noise_sum_by_at_most_c_on_one_process(dtype, device):
    distance = _distance(1, dtype, device)
    assert 0.5 * C < distance <= C * (1 + 1e-5)  # the removed example is clipped, so it moved the sum by ~C


@pytest.mark.slow
def test_one_example_moves_the_pre_noise_sum_by_at_most_c_on_two_processes():
    distance = _distance(2, torch.bfloat16)
    assert 0.5 * C < distance <= C * (1 + 1e-5)


def test_under_bf16_autocast_one_example_moves_the_pre_noise_sum_by_at_most_c():
    full, without = (_pre_noise_sums(DistEnv(), torch.float32, r, autocast=True) for r in (None, REMOVED))
    distance = sum(float((full[k].double() - without[k].double()).pow(2).sum()) for k in full) ** 0.5
    assert 0.5 * C < distance <= C * (1 + 1e-5)


@pytest.mark.slow
def test_under_fsdp2_bf16_gathers_one_example_moves_the_pre_noise_sum_by_at_most_c():
    """precision=bf16-mixed under FSDP2: the layers see bf16 weights and inputs; the norms and sums
    are formed in fp32 from them, so the bound holds for what is summed."""
    distance = _distance(2, torch.float32, autocast=True, fsdp=True)
    assert 0.5 * C < distance <= C * (1 + 1e-5)
