"""Loading Llama/Qwen causal LMs and their tokenizers from a hub name or a local folder."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpllm.config import ModelConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_tokenizer(config: ModelConfig):
    """``config.name_or_path`` may be a hub name (e.g. Qwen/Qwen2.5-0.5B) or a save_pretrained folder."""
    tokenizer = AutoTokenizer.from_pretrained(config.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(config.name_or_path, dtype=DTYPES[config.dtype])
    if config.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=config.lora_targets, lora_dropout=0.0)
        model = get_peft_model(model, lora)
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    """Padding is masked everywhere, so any id serves; prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
