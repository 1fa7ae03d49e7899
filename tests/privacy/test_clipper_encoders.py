"""Per-sample clipping on BERT and RoBERTa sequence classifiers against torch.func."""

import pytest
import torch
from torch.func import functional_call, jacrev
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from dpllm.classification import collate, forward_per_sample_loss, model_inputs
from dpllm.privacy import PerSampleClipper


def _model(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(type_vocab_size=2, **common))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(type_vocab_size=1, pad_token_id=1, **common))
    model = model.double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.uniform_(0.5, 1.5)
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    examples = []
    for n, split in ((9, 4), (6, 3), (11, 5), (4, 2)):
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "token_type_ids": [0] * split + [1] * (n - split), "label": len(examples) % 3})
    return collate(examples, pad_id=1)


def _reference(model, batch):
    """Jacobian of the per-sample loss vector: name -> (B, *shape)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    inputs = model_inputs(model, batch)

    def losses(ps):
        logits = functional_call(model, (ps, buffers), kwargs=inputs).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

    return jacrev(losses)(params)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("strategy", ["ghost", "direct"])
def test_encoder_norms_and_clipped_sum_match_torch_func(family, strategy):
    model = _model(family)
    batch = _batch()
    ref = _reference(model, batch)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    C = float(ref_norms.median())
    clipper = PerSampleClipper(model, max_grad_norm=C, strategy=strategy)
    norms = clipper.backward(forward_per_sample_loss(model, batch))
    torch.testing.assert_close(norms, ref_norms, rtol=1e-8, atol=1e-12)
    factors = (C / ref_norms).clamp(max=1.0)
    names = {n for n, _ in model.named_parameters()}
    assert {"bert.embeddings.position_embeddings.weight", "roberta.embeddings.position_embeddings.weight"} & names
    for n, p in model.named_parameters():
        expected = torch.einsum("b,b...->...", factors, ref[n])
        torch.testing.assert_close(p.grad, expected, rtol=1e-8, atol=1e-12, msg=n)


def test_bert_called_without_position_ids_says_to_pass_them():
    model = _model("bert")
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}  # no position_ids
    logits = model(**inputs).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    with pytest.raises(ValueError, match=r"output has leading dim 1 .*pass \(B, T\) position_ids"):
        clipper.backward(loss)
