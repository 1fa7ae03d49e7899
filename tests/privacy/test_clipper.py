"""PerSampleClipper against independent per-sample gradients from torch.func."""

import warnings

import pytest
import torch
from torch import nn

from dpllm.lm import forward_per_sample_loss
from dpllm.privacy import PerSampleClipper, UnsupportedModuleError
from tests.conftest import tiny_batch, tiny_model
from tests.privacy.reference import clipped_reference

warnings.filterwarnings("ignore", message=".*batching rule.*")

TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def assert_matches(model, batch, max_grad_norm, dtype, strategy="auto", reference=None, mode="book_keeping"):
    ref_norms, ref_clipped = reference or clipped_reference(model, batch, max_grad_norm)
    clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm, strategy=strategy, mode=mode)  # the check runs too
    model.zero_grad(set_to_none=True)
    norms = clipper.backward(forward_per_sample_loss(model, batch))
    clipper.detach()
    rel = TOL[dtype]
    torch.testing.assert_close(norms, ref_norms.to(norms.dtype), rtol=rel, atol=0)
    assert ((ref_norms > max_grad_norm).any() and (ref_norms < max_grad_norm).any()), "test must clip some samples, not all"
    named = dict(model.named_parameters())
    for name, expected in ref_clipped.items():
        got = named[name].grad
        scale = expected.norm()
        assert (got - expected).norm() <= rel * scale + 1e-12, f"{name}: rel err {((got - expected).norm() / scale).item():.2e}"


def _median_norm(model, batch):
    ref_norms, _ = clipped_reference(model, batch, 1.0)
    return ref_norms.median().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "family,tied,bias",
    [("llama", True, False), ("llama", False, False), ("llama", False, True), ("qwen2", True, True), ("qwen2", False, True)],
)
@pytest.mark.parametrize("mode", ["book_keeping", "two_pass"])
def test_matches_torch_func(family, tied, bias, dtype, mode):
    model = tiny_model(family, tied=tied, bias=bias, dtype=dtype)
    batch = tiny_batch()
    assert_matches(model, batch, _median_norm(model, batch), dtype, mode=mode)


@pytest.mark.parametrize("strategy", ["ghost", "direct"])
def test_both_norm_strategies_exact(strategy):
    model = tiny_model("qwen2", tied=True, dtype=torch.float64)
    batch = tiny_batch()
    assert_matches(model, batch, _median_norm(model, batch), torch.float64, strategy=strategy)


def test_auto_strategy_mixes_paths():
    # hidden 16 with T=24: 2T^2 > 16*32, so the MLP/attention weights go direct, the embedding ghost.
    model = tiny_model("llama", tied=True, dtype=torch.float64, hidden=16)
    batch = tiny_batch(lengths=(24, 20, 24, 9))
    assert_matches(model, batch, _median_norm(model, batch), torch.float64)


def test_tied_norm_includes_cross_term():
    """Norm of the sum of embedding and lm_head contributions, not the sum of their norms."""
    from tests.privacy.reference import per_sample_grads

    model = tiny_model("llama", tied=True, dtype=torch.float64)
    batch = tiny_batch()
    exact = per_sample_grads(model, batch)["model.embed_tokens.weight"].flatten(1).norm(dim=1)
    # The same weights untied: each use's contribution separately.
    untied = tiny_model("llama", tied=False, dtype=torch.float64)
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(model.model.embed_tokens.weight)
    parts = per_sample_grads(untied, batch)
    emb, head = parts["model.embed_tokens.weight"].flatten(1), parts["lm_head.weight"].flatten(1)
    torch.testing.assert_close((emb + head).norm(dim=1), exact, rtol=1e-10, atol=0)
    separate = (emb.norm(dim=1) ** 2 + head.norm(dim=1) ** 2).sqrt()
    assert ((separate - exact).abs() / exact).max() > 1e-3, "cross term too small for the test to mean anything"

    for name, p in model.named_parameters():
        if name != "model.embed_tokens.weight":
            p.requires_grad_(False)
    norms = PerSampleClipper(model, max_grad_norm=1e9).backward(forward_per_sample_loss(model, batch))
    torch.testing.assert_close(norms, exact, rtol=1e-10, atol=0)


def test_tied_clipped_gradient_respects_bound():
    """Every clipped per-sample gradient of the tied matrix has norm <= C."""
    model = tiny_model("llama", tied=True, dtype=torch.float64)
    for name, p in model.named_parameters():
        if name != "model.embed_tokens.weight":
            p.requires_grad_(False)
    batch = tiny_batch(lengths=(9,))
    clipper = PerSampleClipper(model, max_grad_norm=1e-3)
    clipper.backward(forward_per_sample_loss(model, batch))
    assert model.model.embed_tokens.weight.grad.norm().item() == pytest.approx(1e-3, rel=1e-9)


@pytest.mark.parametrize("mode", ["book_keeping", "two_pass"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_matches_torch_func(family, mode):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(family, tied=True, dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero; make the test non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = tiny_batch()
    assert_matches(model, batch, _median_norm(model, batch), torch.float64, mode=mode)


@pytest.mark.parametrize("mode", ["book_keeping", "two_pass"])
@pytest.mark.parametrize("family,tied,lora", [("llama", True, False), ("llama", False, False), ("qwen2", True, False),
                                               ("qwen2", False, False), ("llama", True, True)])
def test_exact_under_activation_checkpointing(family, tied, lora, mode, monkeypatch):
    """Hugging Face's non-reentrant checkpointing recomputes each decoder layer in backward (twice
    in two_pass): the clipper records no call of the recomputed forwards (their taps only hand the
    recomputed inputs to the first forward's) and its norms and sums still match torch.func's."""
    from peft import LoraConfig, get_peft_model

    recorded_in_backward = []
    record = PerSampleClipper._record

    def spy(self, module, inputs, output):
        before = len(self._calls)
        tapped = record(self, module, inputs, output)
        if self._collecting and len(self._calls) != before:
            recorded_in_backward.append(module)
        return tapped

    monkeypatch.setattr(PerSampleClipper, "_record", spy)

    model = tiny_model(family, tied=tied, bias=family == "qwen2", dtype=torch.float64)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    batch = tiny_batch()
    C = _median_norm(model, batch)
    reference = clipped_reference(model, batch, C)  # torch.func, without checkpointing
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []
    model.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early
    assert_matches(model, batch, C, torch.float64, reference=reference, mode=mode)
    assert len(calls) == {"book_keeping": 2, "two_pass": 3}[mode]  # the layer ran again in each backward: checkpointing was on
    assert recorded_in_backward == []


def test_padding_and_masked_positions_contribute_nothing():
    model = tiny_model("llama", tied=True, dtype=torch.float64)
    padded = tiny_batch(lengths=(10, 4))
    alone = {k: v[1:, :4] for k, v in padded.items()}
    clipper = PerSampleClipper(model, max_grad_norm=1e9)
    norms_padded = clipper.backward(forward_per_sample_loss(model, padded))
    model.zero_grad(set_to_none=True)
    norms_alone = clipper.backward(forward_per_sample_loss(model, alone))
    torch.testing.assert_close(norms_padded[1], norms_alone[0], rtol=1e-10, atol=0)


def test_layernorm_and_embedding_padding_idx_model():
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8, padding_idx=0)
            self.norm = nn.LayerNorm(8)
            self.out = nn.Linear(8, 20)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.out(self.norm(self.emb(input_ids))))

    model = Tiny().double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    batch = tiny_batch(vocab=20, lengths=(6, 3, 5))
    batch["input_ids"][1, 4] = 0  # a real padding token id inside the sequence
    assert_matches(model, batch, _median_norm(model, batch), torch.float64)


def test_unsupported_trainable_module_raises_with_its_name():
    model = tiny_model("llama")
    model.model.layers[0].extra = nn.Conv1d(4, 4, 1)
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.0\.extra\.weight"):
        PerSampleClipper(model, max_grad_norm=1.0)
    model.model.layers[0].extra.requires_grad_(False)
    PerSampleClipper(model, max_grad_norm=1.0)  # frozen: skipped


def test_batchnorm_rejected():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(UnsupportedModuleError, match="mixes samples"):
        PerSampleClipper(model, max_grad_norm=1.0)


def test_rms_norm_variant_with_other_formula_is_refused():
    class GemmaStyleRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(d))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    with pytest.raises(UnsupportedModuleError, match="GemmaStyleRMSNorm"):
        PerSampleClipper(nn.Sequential(GemmaStyleRMSNorm(4)), max_grad_norm=1.0)


@pytest.mark.parametrize("mode", ["book_keeping", "two_pass"])
def test_parameter_used_outside_its_module_is_detected(mode):
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) + x @ self.lin.weight  # second use bypasses the hook

    model = Sneaky().double()
    clipper = PerSampleClipper(model, max_grad_norm=1.0, mode=mode)
    with pytest.raises(UnsupportedModuleError, match="lin.weight"):
        clipper.backward(model(torch.randn(3, 4, dtype=torch.float64)).pow(2).sum(1))


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_grad_norm"):
        PerSampleClipper(model, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        PerSampleClipper(model, max_grad_norm=-1.0)
    for bound in (float("inf"), float("nan")):  # inf would leave every sample unclipped
        with pytest.raises(ValueError, match="max_grad_norm must be finite and > 0"):
            PerSampleClipper(model, max_grad_norm=bound)
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    batch = tiny_batch()
    loss = forward_per_sample_loss(model, batch)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        clipper.backward(loss.sum())
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        clipper.backward(torch.stack([loss, loss], 1))


@pytest.mark.parametrize("mode", ["book_keeping", "two_pass"])
def test_non_finite_sample_is_dropped(mode):
    model = tiny_model("llama", dtype=torch.float64)
    batch = tiny_batch()
    clipper = PerSampleClipper(model, max_grad_norm=1e9, mode=mode)
    loss = forward_per_sample_loss(model, batch)
    poisoned = torch.cat([loss[:1] * float("nan"), loss[1:]])
    norms = clipper.backward(poisoned)
    assert clipper.last_dropped == 1 and torch.isnan(norms[0]) and torch.isfinite(norms[1:]).all()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    rest = {k: v[1:] for k, v in batch.items()}
    clipper.backward(forward_per_sample_loss(model, rest))
    for n, p in model.named_parameters():
        assert torch.isfinite(grads[n]).all()
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["book_keeping", "two_pass"])
def test_gradients_accumulate_across_micro_batches(mode):
    model = tiny_model("llama", dtype=torch.float64)
    batch = tiny_batch()
    clipper = PerSampleClipper(model, max_grad_norm=0.5, mode=mode)
    clipper.backward(forward_per_sample_loss(model, batch))
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for half in (slice(0, 2), slice(2, 4)):
        clipper.backward(forward_per_sample_loss(model, {k: v[half] for k, v in batch.items()}))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[n], rtol=1e-9, atol=1e-12)


def test_bf16_model_norms_and_sums_accumulate_in_fp32():
    """A bf16 model: norms come back in fp32 and match the fp64 reference to bf16 forward accuracy."""
    model64 = tiny_model("llama", tied=True, dtype=torch.float64)
    model16 = tiny_model("llama", tied=True, dtype=torch.bfloat16)
    model64.load_state_dict({k: v.double() for k, v in model16.state_dict().items()})  # the same (rounded) weights
    batch = tiny_batch()
    C = 4.0  # between the samples' norms (3.57, 4.94, 3.57, 10.7): two clipped, two not
    ref_norms, ref_clipped = clipped_reference(model64, batch, C)
    assert (ref_norms > 1.1 * C).sum() == 2 and (ref_norms < 0.9 * C).sum() == 2
    norms = PerSampleClipper(model16, max_grad_norm=C).backward(forward_per_sample_loss(model16, batch))
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-2, atol=0)  # measured: 0.25%
    named = dict(model16.named_parameters())
    for name, expected in ref_clipped.items():
        got = named[name].grad
        assert got.dtype == torch.bfloat16
        assert (got.double() - expected).norm() <= 0.03 * expected.norm() + 1e-6, name  # measured: at most 1.1%


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_other_families_rms_norms_recognised_and_exact(family):
    """Qwen3 adds per-head q/k RMSNorms over (B, T, H, d): a rule with extra leading dims."""
    import transformers

    cfg_cls = {"qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[family]
    model_cls = {"qwen3": transformers.Qwen3ForCausalLM, "mistral": transformers.MistralForCausalLM}[family]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    model = model_cls(cfg).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    norm_classes = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    assert norm_classes == {f"{family.capitalize()}RMSNorm"}
    batch = tiny_batch()
    assert_matches(model, batch, _median_norm(model, batch), torch.float64)


@pytest.mark.parametrize("setting", [dict(max_norm=1.0), dict(sparse=True), dict(scale_grad_by_freq=True)])
def test_embeddings_without_a_per_sample_rule_are_refused(setting):
    model = nn.Sequential(nn.Embedding(10, 4, **setting), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModuleError, match="Embedding with max_norm, scale_grad_by_freq or sparse=True"):
        PerSampleClipper(model, max_grad_norm=1.0)


def test_a_finite_loss_with_a_non_finite_gradient_norm_is_dropped():
    """Loss w.x with x ~ 1e30: finite loss (1e20), but the squared gradient norm overflows fp32."""
    layer = nn.Linear(3, 1, bias=False)
    nn.init.constant_(layer.weight, 1e-10)
    x = torch.tensor([[1.0, 2.0, 3.0], [1e30, 1e30, 1e30], [0.5, 0.0, 1.0]])
    clipper = PerSampleClipper(layer, max_grad_norm=1.0, verify_first_backward=False)
    loss = layer(x).squeeze(1)
    assert torch.isfinite(loss).all()
    norms = clipper.backward(loss)
    assert clipper.last_dropped == 1 and torch.isnan(norms[1]) and torch.isfinite(norms[[0, 2]]).all()
    kept = x[[0, 2]]
    expected = (kept / kept.norm(dim=1, keepdim=True).clamp_min(1.0)).sum(0)  # clip factors min(1, C/||x_i||)
    torch.testing.assert_close(layer.weight.grad[0], expected)


@pytest.mark.parametrize("mode", ["book_keeping", "two_pass"])
def test_two_pass_hands_each_sum_on_during_its_backward(mode):
    """two_pass forms each parameter's clipped sum at its tap in the second backward (nothing
    waits for the end of it), the tied embedding once its last use is in; book-keeping hands
    every sum on after its backward. Either way each parameter arrives once per micro-batch."""
    model = tiny_model("llama", tied=True, dtype=torch.float64)
    seen = []
    clipper = PerSampleClipper(
        model, max_grad_norm=1.0, mode=mode, verify_first_backward=False,
        grad_sink=lambda name, s: seen.append((name, torch._C._current_graph_task_id() >= 0)),
    )
    clipper.backward(forward_per_sample_loss(model, tiny_batch()))
    names = [n for n, _ in seen]
    assert sorted(names) == sorted(clipper.shapes)
    assert all(inside == (mode == "two_pass") for _, inside in seen)
    if mode == "two_pass":  # backward order: the head (tied to the embedding) first, but it is handed on last
        assert names[-1] == "model.embed_tokens.weight"


def test_two_pass_holds_the_inputs_of_cached_grams():
    """The first pass caches a layer input's Gram under the input's address. Under checkpointing
    each recomputed input is freed once used, and a later layer's input of the same shape could
    land at that address and be given the stale Gram (wrong norms): the cache holds its inputs."""
    import weakref

    from dpllm.privacy import contributions as contrib
    from dpllm.privacy.clipper import PerSampleClipper, _Stream

    stream = _Stream({"q": 1, "k": 1}, torch.zeros(2, dtype=torch.float64), PerSampleClipper._squared_norm)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    alive = weakref.ref(x)
    stream.add("q", contrib.Outer(torch.randn(2, 5, 4, dtype=torch.float64), x))
    del x
    assert alive() is not None  # while its Gram is cached
    stream.finish()
    assert alive() is None  # released with the cache
