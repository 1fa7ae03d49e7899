"""The causal-LM per-sample loss, checked against Hugging Face's own loss and by hand (not against itself)."""

import math

import torch

from dpllm.lm import IGNORE_INDEX, collate, forward_per_sample_loss
from tests.conftest import tiny_model


def test_each_sample_loss_is_hugging_faces_labels_loss_on_that_sample_alone():
    model = tiny_model("llama", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(3):  # equal lengths: no padding, so HF's loss on the sample alone is the reference
        ids = torch.randint(1, 96, (9,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    ours = forward_per_sample_loss(model, collate(examples, 0))
    for i, e in enumerate(examples):
        hf = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]), use_cache=False).loss
        torch.testing.assert_close(ours[i], hf.to(ours.dtype), rtol=1e-6, atol=1e-6)  # HF's loss is fp32


def test_padded_sample_loss_by_hand():
    """Mean over the target tokens of -log softmax(logits at t)[token t+1], padding and prompt excluded."""
    model = tiny_model("llama", dtype=torch.float64)
    short = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]}
    long = {"input_ids": [9, 10, 11, 12, 13, 14], "labels": [IGNORE_INDEX, 10, 11, 12, 13, 14]}
    ours = forward_per_sample_loss(model, collate([short, long], pad_id=0))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([short["input_ids"]]), use_cache=False).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    # targets 7 (predicted at position 1) and 8 (at position 2)
    expected = -(log_probs[1, 7] + log_probs[2, 8]) / 2
    assert math.isclose(float(ours[0].detach()), float(expected), rel_tol=1e-12)
