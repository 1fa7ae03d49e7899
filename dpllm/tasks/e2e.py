"""E2E NLG: restaurant meaning representations -> one-sentence descriptions.

The official CSVs have two columns, ``mr`` (e.g. ``name[The Eagle], food[French]``) and ``ref``;
the input is the MR as written. Hub copies (``e2e_nlg``) name them ``meaning_representation`` and
``human_reference``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dpllm.tasks.data2text import DataError, Example, not_a_data_folder, open_data

OFFICIAL_FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
HUB_COLUMNS = ("meaning_representation", "human_reference")


def load(source: str | Path, split: str = "train", max_examples: int | None = None) -> list[Example]:
    """Examples from an official CSV file, a folder holding the official files, or a hub dataset name."""
    path = Path(source)
    if path.is_dir() and (path / OFFICIAL_FILES.get(split, "")).is_file():
        path = path / OFFICIAL_FILES[split]
    if path.is_file() or path.suffix == ".csv":
        return load_csv(path, max_examples)
    if path.is_dir():
        try:
            return _load_hub(str(source), split, max_examples)
        except Exception as e:  # the folder is neither official nor in the hub's layout: say what was looked for
            raise not_a_data_folder(path, split, OFFICIAL_FILES, e) from e
    return _load_hub(str(source), split, max_examples)


def load_csv(path: str | Path, max_examples: int | None = None) -> list[Example]:
    """Rows of an official E2E CSV; a missing column, a malformed row or no rows is an error."""
    path = Path(path)
    examples = []
    with open_data(path) as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
            raise DataError(f"{path}:1: expected a header with columns 'mr' and 'ref', got {reader.fieldnames}")
        for row in reader:
            line = reader.line_num
            if None in row or row.get("mr") is None or row.get("ref") is None:
                raise DataError(f"{path}:{line}: expected 2 fields (mr, ref)")
            mr, ref = row["mr"].strip(), row["ref"].strip()
            if not mr or not ref:
                raise DataError(f"{path}:{line}: empty {'mr' if not mr else 'ref'}")
            examples.append(Example(mr, ref))
            if max_examples is not None and len(examples) >= max_examples:
                break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _load_hub(name: str, split: str, max_examples: int | None) -> list[Example]:
    import datasets

    rows = datasets.load_dataset(name, split=split)
    missing = [c for c in HUB_COLUMNS if c not in rows.column_names]
    if missing:
        raise DataError(f"{name} ({split}): expected columns {HUB_COLUMNS}, missing {missing}")
    examples = []
    for i, row in enumerate(rows):
        mr, ref = (row[c].strip() if isinstance(row[c], str) else "" for c in HUB_COLUMNS)
        if not mr or not ref:
            raise DataError(f"{name} ({split}) row {i}: empty {'meaning_representation' if not mr else 'human_reference'}")
        examples.append(Example(mr, ref))
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        raise DataError(f"{name} ({split}): no examples")
    return examples
