"""Modules that mix samples are refused, trainable or not, by type and by behaviour, naming the module."""

import pytest
import torch
from torch import nn

from dpllm.lm import forward_per_sample_loss
from dpllm.privacy import PerSampleClipper, UnsupportedModuleError
from dpllm.privacy.mixing import check_per_sample
from tests.conftest import tiny_batch, tiny_model


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm1d(3, affine=False),  # no parameters at all
        nn.BatchNorm1d(3).requires_grad_(False),  # frozen (what model.freeze does)
        nn.SyncBatchNorm(3),
        nn.LazyBatchNorm1d(),
        nn.InstanceNorm1d(3, track_running_stats=True),
    ],
    ids=["affine_false", "frozen", "sync", "lazy", "instance_running_stats"],
)
def test_sample_mixing_or_data_state_modules_are_refused_trainable_or_not(norm):
    model = nn.Sequential(nn.Linear(3, 3), norm)
    with pytest.raises(UnsupportedModuleError, match=rf"module '1' \({type(norm).__name__}\)"):
        PerSampleClipper(model, max_grad_norm=1.0)


def test_instance_norm_without_running_statistics_is_per_sample_and_accepted():
    PerSampleClipper(nn.Sequential(nn.Linear(3, 3), nn.InstanceNorm1d(3)), max_grad_norm=1.0)


class BatchCentering(nn.Module):
    """Subtracts the batch mean: no parameters, no known type, mixes samples."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def test_behaviour_probe_names_an_unknown_mixing_module():
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    mlp.act_fn = nn.Sequential(mlp.act_fn, BatchCentering())
    batch = tiny_batch(lengths=(8, 8, 6, 8))
    with pytest.raises(UnsupportedModuleError, match=r"module 'model\.layers\.1\.mlp\.act_fn\.1' \(BatchCentering\) mixes samples"):
        check_per_sample(model, forward_per_sample_loss, batch)


def test_behaviour_probe_accepts_per_sample_models_with_dropout_and_restores_the_generator():
    model = tiny_model("qwen2", tied=False)
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    model.eval()
    state = torch.get_rng_state()
    check_per_sample(model, forward_per_sample_loss, tiny_batch(lengths=(9, 7, 5, 9)))
    assert torch.equal(torch.get_rng_state(), state)  # dropout masks of the run are not shifted
    assert not model.training  # the probe runs in train mode and restores the mode
