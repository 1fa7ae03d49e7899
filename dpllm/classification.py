"""Sequence-classification batches and the per-sample loss that private training clips.

BERT-family embeddings look position ids up from a (1, T) buffer and broadcast the result over
the batch, which would hide per-sample gradients of the position table: batches therefore carry
explicit (B, T) position ids. RoBERTa-family models build (B, T) ids from the input themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OWN_POSITION_IDS = ("roberta", "xlm-roberta", "camembert")


def collate(examples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad input ids (and token types); labels as a (B,) tensor."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    types = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        if "token_type_ids" in e:
            types[i, :n] = torch.tensor(e["token_type_ids"])
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def model_inputs(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    if getattr(model.config, "type_vocab_size", 0) <= 1:
        inputs.pop("token_type_ids")
    if model.config.model_type not in OWN_POSITION_IDS:
        b, t = batch["input_ids"].shape
        inputs["position_ids"] = torch.arange(t, device=batch["input_ids"].device).expand(b, t)
    return inputs


def forward_per_sample_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of each sample, shape (B,)."""
    logits = model(**model_inputs(model, batch)).logits
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), batch["labels"], reduction="none")


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int) -> tuple[float, list[int]]:
    """Mean loss and the predicted class of every example (batched by length, returned in order)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, predictions = 0.0, [0] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk], pad_id).items()}
        logits = model(**model_inputs(model, batch)).logits.float()
        total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        for i, p in zip(chunk, logits.argmax(-1).tolist()):
            predictions[i] = p
    model.train(was_training)
    return total / max(len(examples), 1), predictions
