"""Batched generation of one output per prompt: beam search (default) or greedy."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dpllm.models import pad_token_id


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    num_beams: int = 5,
    max_new_tokens: int = 100,
    batch_size: int = 16,
    progress: bool = False,
    synced: bool = False,
) -> list[str]:
    """Decoded continuations, in prompt order, cut at the first newline and stripped.

    Prompts are tokenised exactly as in training (special tokens added) and left-padded; batches
    are formed from prompts of similar length to waste little compute on padding.
    """
    was_training = model.training
    model.eval()
    root = _fsdp_root(model)
    if root is not None:  # generate() calls the wrapped model's forward, past the FSDP2 root's hooks
        root.unshard()
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not progress):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i])
            mask[row, width - n :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            early_stopping=num_beams > 1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
        for row, i in enumerate(batch):
            text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
            outputs[i] = text.split("\n", 1)[0].strip()
    if root is not None:
        root.reshard()
    model.train(was_training)
    return outputs


def _fsdp_root(model):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return model if isinstance(model, FSDPModule) else None
