"""GLUE sentence(-pair) classification: SST-2, QNLI, QQP, MNLI, in the original TSV layout.

Each task names its text columns and label column; string labels map to ids in a fixed order.
Files come from a folder with the GLUE names (``train.tsv``, ``dev.tsv``; MNLI
``dev_matched.tsv``), a single TSV file, or a ``datasets`` hub name (``nyu-mll/glue`` layout:
``sentence`` / ``question``+``sentence`` / ``question1``+``question2`` / ``premise``+``hypothesis``,
integer ``label``). Metrics: accuracy, and F1 of the positive class for QQP.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from dpllm.tasks.data2text import DataError, open_data


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]  # label strings in id order
    hub_config: str
    hub_columns: tuple[str, ...]
    files: dict


GLUE = {
    "sst2": GlueTask("sst2", ("sentence",), "label", ("0", "1"), "sst2", ("sentence",),
                     {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}),
    "qnli": GlueTask("qnli", ("question", "sentence"), "label", ("entailment", "not_entailment"), "qnli",
                     ("question", "sentence"), {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}),
    "qqp": GlueTask("qqp", ("question1", "question2"), "is_duplicate", ("0", "1"), "qqp", ("question1", "question2"),
                    {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}),
    "mnli": GlueTask("mnli", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"), "mnli",
                     ("premise", "hypothesis"), {"train": "train.tsv", "validation": "dev_matched.tsv", "test": "test_matched.tsv"}),
}


@dataclass(frozen=True)
class ClassificationExample:
    text_a: str
    text_b: str | None
    label: int


def load(task: str, source: str | Path, split: str = "train", max_examples: int | None = None) -> list[ClassificationExample]:
    spec = GLUE[task]
    path = Path(source)
    if path.is_dir() and (path / spec.files.get(split, "")).is_file():
        path = path / spec.files[split]
    if path.is_file() or path.suffix == ".tsv":
        return load_tsv(spec, path, max_examples)
    return _load_hub(spec, str(source), split, max_examples)


def load_tsv(spec: GlueTask, path: Path, max_examples: int | None = None) -> list[ClassificationExample]:
    csv.field_size_limit(sys.maxsize)
    examples = []
    with open_data(path) as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        needed = (*spec.text_columns, spec.label_column)
        if header is None or not set(needed) <= set(header):
            raise DataError(f"{path}:1: expected columns {list(needed)} for {spec.name}, got {header}")
        index = {c: header.index(c) for c in needed}
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: expected {len(header)} tab-separated fields, got {len(row)}")
            label = row[index[spec.label_column]].strip()
            if label not in spec.labels:
                raise DataError(f"{path}:{line}: label {label!r} is not one of {list(spec.labels)}")
            texts = [row[index[c]].strip() for c in spec.text_columns]
            if not all(texts):
                raise DataError(f"{path}:{line}: empty text")
            examples.append(ClassificationExample(texts[0], texts[1] if len(texts) > 1 else None, spec.labels.index(label)))
            if max_examples is not None and len(examples) >= max_examples:
                break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _load_hub(spec: GlueTask, name: str, split: str, max_examples: int | None) -> list[ClassificationExample]:
    import datasets

    config = spec.hub_config if name in ("glue", "nyu-mll/glue") else None
    rows = datasets.load_dataset(name, config, split=split)
    examples = []
    for i, row in enumerate(rows):
        label = row.get("label")
        if not isinstance(label, int) or not 0 <= label < len(spec.labels):
            raise DataError(f"{name} ({split}) row {i}: label {label!r} is not in 0..{len(spec.labels) - 1}")
        texts = [str(row.get(c) or "").strip() for c in spec.hub_columns]
        if not all(texts):
            raise DataError(f"{name} ({split}) row {i}: empty text in {spec.hub_columns}")
        examples.append(ClassificationExample(texts[0], texts[1] if len(texts) > 1 else None, label))
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        raise DataError(f"{name} ({split}): no examples")
    return examples


def encode(example: ClassificationExample, tokenizer, max_length: int) -> tuple[dict, bool]:
    """Token ids (and token types for pairs) of the example, truncated to ``max_length``."""
    enc = tokenizer(example.text_a, example.text_b, verbose=False)  # no over-length warning: truncation follows
    truncated = len(enc["input_ids"]) > max_length
    if truncated:  # the tokenizer's own pair truncation (longest first) keeps both special-token frames
        enc = tokenizer(example.text_a, example.text_b, truncation=True, max_length=max_length)
    out = {"input_ids": enc["input_ids"], "label": example.label}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    return out, truncated


def scores(predictions: list[int], labels: list[int], task: str) -> dict[str, float]:
    """Accuracy, and F1 of class 1 for QQP (as GLUE reports it)."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    out = {"accuracy": sum(p == y for p, y in zip(predictions, labels)) / len(labels)}
    if task == "qqp":
        tp = sum(p == 1 and y == 1 for p, y in zip(predictions, labels))
        fp = sum(p == 1 and y == 0 for p, y in zip(predictions, labels))
        fn = sum(p == 0 and y == 1 for p, y in zip(predictions, labels))
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out
