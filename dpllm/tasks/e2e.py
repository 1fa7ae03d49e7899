"""E2E NLG: restaurant meaning representations -> one-sentence descriptions.

The official CSV has two columns, ``mr`` (e.g. ``name[The Eagle], food[French]``) and ``ref``.
A training example is the MR as prompt and the reference as target; loss is on target tokens.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dpllm.lm import IGNORE_INDEX

PROMPT_SUFFIX = "\n"


class DataError(ValueError):
    pass


@dataclass
class E2EExample:
    mr: str
    ref: str


def load_e2e(path: str | Path, max_examples: int | None = None) -> list[E2EExample]:
    """Rows of an official E2E CSV; a missing column, a malformed row or no rows is an error."""
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    examples = []
    with handle:
        try:
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
                examples.append(E2EExample(mr, ref))
                if max_examples is not None and len(examples) >= max_examples:
                    break
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def prompt(example: E2EExample) -> str:
    return example.mr + PROMPT_SUFFIX


def tokenize(example: E2EExample, tokenizer, max_length: int) -> tuple[dict, bool]:
    """input_ids/labels with the prompt masked; returns (example, whether it was truncated)."""
    prompt_ids = tokenizer(prompt(example), add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(" " + example.ref, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}, len(prompt_ids) + len(target_ids) > max_length
