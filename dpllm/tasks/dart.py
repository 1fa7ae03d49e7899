"""DART: sets of (subject, relation, object) triples -> text.

Official v1.1.1 JSON: a list of entries ``{"tripleset": [[s, r, o], ...], "annotations":
[{"source": ..., "text": ...}, ...]}``. The input is the triples linearised as
``s | r | o`` joined by `` && ``; every annotation text is a reference (and a training target).
Hub copies (``dart``) store ``annotations`` as ``{"source": [...], "text": [...]}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpllm.tasks.data2text import DataError, Example, not_a_data_folder, open_data

OFFICIAL_FILES = {
    "train": "dart-v1.1.1-full-train.json",
    "validation": "dart-v1.1.1-full-dev.json",
    "test": "dart-v1.1.1-full-test.json",
}
TRIPLE_SEPARATOR = " && "


def linearise(tripleset: list[list[str]]) -> str:
    return TRIPLE_SEPARATOR.join(" | ".join(part.strip() for part in triple) for triple in tripleset)


def load(source: str | Path, split: str = "train", max_examples: int | None = None) -> list[Example]:
    """Examples from an official JSON file, a folder holding the official files, or a hub dataset name."""
    path = Path(source)
    if path.is_dir() and (path / OFFICIAL_FILES.get(split, "")).is_file():
        path = path / OFFICIAL_FILES[split]
    if path.is_file() or path.suffix == ".json":
        return load_json(path, max_examples)
    if path.is_dir():
        try:
            return _load_hub(str(source), split, max_examples)
        except Exception as e:  # the folder is neither official nor in the hub's layout: say what was looked for
            raise not_a_data_folder(path, split, OFFICIAL_FILES, e) from e
    return _load_hub(str(source), split, max_examples)


def load_json(path: str | Path, max_examples: int | None = None) -> list[Example]:
    path = Path(path)
    with open_data(path) as handle:
        try:
            entries = json.load(handle)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of entries")
    examples = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        annotations = entry.get("annotations") if isinstance(entry, dict) else None
        if not isinstance(annotations, list):
            raise DataError(f"{where}: missing 'annotations' list")
        texts = []
        for a in annotations:
            if not isinstance(a, dict) or not isinstance(a.get("text"), str):
                raise DataError(f"{where}: an annotation without 'text'")
            texts.append(a["text"])
        examples.extend(_entry_examples(entry.get("tripleset"), texts, where))
        if max_examples is not None and len(examples) >= max_examples:
            return examples[:max_examples]
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _entry_examples(tripleset, texts: list[str], where: str) -> list[Example]:
    if not isinstance(tripleset, list) or not tripleset:
        raise DataError(f"{where}: missing or empty 'tripleset'")
    for triple in tripleset:
        if not (isinstance(triple, list) and len(triple) == 3 and all(isinstance(p, str) for p in triple)):
            raise DataError(f"{where}: a triple must be [subject, relation, object], got {triple!r}")
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{where}: no non-empty annotation text")
    source = linearise(tripleset)
    return [Example(source, t) for t in texts]


def _load_hub(name: str, split: str, max_examples: int | None) -> list[Example]:
    import datasets

    rows = datasets.load_dataset(name, split=split)
    examples = []
    for i, row in enumerate(rows):
        annotations = row.get("annotations") or {}
        texts = annotations.get("text") if isinstance(annotations, dict) else None
        if not isinstance(texts, list):
            raise DataError(f"{name} ({split}) row {i}: missing annotations.text")
        examples.extend(_entry_examples(row.get("tripleset"), texts, f"{name} ({split}) row {i}"))
        if max_examples is not None and len(examples) >= max_examples:
            return examples[:max_examples]
    if not examples:
        raise DataError(f"{name} ({split}): no examples")
    return examples
