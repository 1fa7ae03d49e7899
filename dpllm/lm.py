"""Causal-LM batches and the per-sample loss that private training clips."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def collate(examples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad ``input_ids``/``labels`` lists; padded positions are masked from attention and loss."""
    length = max((len(e["input_ids"]) for e in examples), default=0)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def per_sample_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over each sample's target tokens, shape (B,).

    A sample with no target token gets loss 0 (and so a zero gradient).
    """
    shift_logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 stays
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    counts = (shift_labels != IGNORE_INDEX).sum(1)
    return token_loss.sum(1) / counts.clamp_min(1)


def forward_per_sample_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return per_sample_loss(out.logits, batch["labels"])
