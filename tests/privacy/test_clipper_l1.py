"""PerSampleClipper(norm="l1") against per-sample gradients from torch.func."""

import warnings

import pytest
import torch

from dpllm.lm import forward_per_sample_loss
from dpllm.privacy import PerSampleClipper
from dpllm.privacy import contributions as C
from tests.conftest import tiny_batch, tiny_model
from tests.privacy.reference import per_sample_grads

warnings.filterwarnings("ignore", message=".*batching rule.*")


def _lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero; make the test non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _reference(model, batch):
    """Per-sample L1 norms of the whole gradient, and the per-sample gradients by name."""
    jac = per_sample_grads(model, batch)
    grads = {n: jac[n] for n, p in model.named_parameters() if p.requires_grad}  # a tied parameter once
    bsz = batch["input_ids"].shape[0]
    return sum(g.reshape(bsz, -1).abs().sum(1) for g in grads.values()), grads


@pytest.mark.parametrize("mode", ["book_keeping", "two_pass"])
@pytest.mark.parametrize("family,tied,lora", [("llama", True, False), ("llama", False, False), ("qwen2", True, False),
                                               ("qwen2", False, False), ("llama", True, True), ("qwen2", False, True)])
def test_l1_norms_and_clipped_sums_match_torch_func(family, tied, lora, mode):
    model = tiny_model(family, tied=tied, bias=family == "qwen2", dtype=torch.float64)
    if lora:
        model = _lora(model)
    batch = tiny_batch()
    ref_norms, grads = _reference(model, batch)
    bound = ref_norms.median().item()
    assert (ref_norms > bound).any() and (ref_norms < bound).any(), "the test must clip some samples, not all"
    clipper = PerSampleClipper(model, max_grad_norm=bound, mode=mode, norm="l1")
    norms = clipper.backward(forward_per_sample_loss(model, batch))
    clipper.detach()
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)
    factors = (bound / ref_norms).clamp(max=1.0)
    named = dict(model.named_parameters())
    for name, g in grads.items():
        expected = torch.tensordot(factors, g, dims=1)
        assert (named[name].grad - expected).norm() <= 1e-8 * expected.norm() + 1e-14, name
    # what the bound promises: every sample's clipped gradient has L1 norm <= C
    clipped_l1 = sum((g * factors.view(-1, *[1] * (g.dim() - 1))).reshape(len(factors), -1).abs().sum(1) for g in grads.values())
    assert (clipped_l1 <= bound * (1 + 1e-10)).all()


def test_l1_chunks_give_the_same_norms(monkeypatch):
    """Per-sample gradients built one sample at a time (the chunking that bounds their memory)."""
    model = tiny_model("llama", tied=True, dtype=torch.float64)
    batch = tiny_batch()
    ref_norms, _ = _reference(model, batch)
    monkeypatch.setattr(C, "L1_CHUNK", 1)
    clipper = PerSampleClipper(model, max_grad_norm=1.0, norm="l1")
    torch.testing.assert_close(clipper.backward(forward_per_sample_loss(model, batch)), ref_norms, rtol=1e-10, atol=0)


def test_repeated_ids_are_summed_before_the_absolute_value():
    """An id looked up twice in a sample: its row's gradient is the sum, whose L1 norm is not the
    sum of the two lookups' (a wrong one-hot shortcut would add |g1| + |g2|)."""
    ids = torch.tensor([[3, 3, 1], [0, 2, 2]])
    right = torch.tensor([[[1.0, -2.0], [-1.0, 1.0], [0.5, 0.5]], [[2.0, 0.0], [1.0, -1.0], [1.0, 2.0]]], dtype=torch.float64)
    c = C.Outer(ids, right, onehot_dim=5)
    dense = C.materialize(c).value
    torch.testing.assert_close(C.l1_norms([c]), dense.abs().flatten(1).sum(1))
    torch.testing.assert_close(C.l1_norms([c]), torch.tensor([1.0 + 1.0, 2.0 + 3.0], dtype=torch.float64))


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        PerSampleClipper(tiny_model(), max_grad_norm=1.0, norm="linf")
