"""What E2E and DART share: (input, reference) pairs, prompts, target-only loss, reference groups.

A training example is the linearised input as prompt and one human reference as target; the loss
covers target tokens only. For scoring, references are grouped by input: one prediction per
unique input, in order of first appearance, against all of that input's references.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dpllm.lm import IGNORE_INDEX

PROMPT_SUFFIX = "\n"


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    source: str  # the linearised input (an E2E meaning representation, DART triples)
    target: str  # one human reference text


def prompt(source: str) -> str:
    return source + PROMPT_SUFFIX


def tokenize(example: Example, tokenizer, max_length: int) -> tuple[dict, bool]:
    """input_ids/labels with the prompt masked; returns (example, whether it was truncated)."""
    prompt_ids = tokenizer(prompt(example.source), add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(" " + example.target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}, len(prompt_ids) + len(target_ids) > max_length


def group_references(examples: list[Example]) -> tuple[list[str], list[list[str]]]:
    """Unique inputs in order of first appearance, and all references of each."""
    groups: dict[str, list[str]] = {}
    for e in examples:
        groups.setdefault(e.source, []).append(e.target)
    return list(groups), list(groups.values())


def write_lines(path: Path, lines: list[str]) -> None:
    """One line per item; newlines inside an item would shift every later line, so they become spaces."""
    path.write_text("".join(" ".join(line.splitlines()) + "\n" for line in lines), encoding="utf-8")


def write_references(path: Path, references: list[list[str]]) -> None:
    """The E2E scorer's multi-reference text format: one reference per line, a blank line between inputs."""
    path.write_text("\n".join("".join(r + "\n" for r in refs) for refs in references), encoding="utf-8")


@contextmanager
def open_data(path: Path):
    """A UTF-8 text handle; a missing file or a non-UTF-8 byte (also while reading) is a DataError naming the file."""
    try:
        handle = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    with handle:
        try:
            yield handle
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_predictions(path: str | Path, num_inputs: int) -> list[str]:
    """One prediction per line, exactly one per unique input; a count mismatch names the file and line."""
    path = Path(path)
    with open_data(path) as f:
        lines = f.read().splitlines()
    if not lines:
        raise DataError(f"{path}: empty file, expected {num_inputs} predictions (one per line)")
    if len(lines) > num_inputs:
        raise DataError(f"{path}:{num_inputs + 1}: more predictions than the {num_inputs} inputs")
    if len(lines) < num_inputs:
        raise DataError(f"{path}:{len(lines) + 1}: missing predictions: {len(lines)} lines for {num_inputs} inputs")
    return lines


def not_a_data_folder(folder: Path, split: str, official_files: dict[str, str], error: Exception) -> DataError:
    """The error for a local folder that holds neither the official file for ``split`` nor a dataset in the hub's layout."""
    wanted = official_files.get(split, f"(no official file for split {split!r})")
    return DataError(
        f"{folder}: no {wanted} for split {split!r} (the official names: {', '.join(official_files.values())}), "
        f"and not a dataset in the hub's layout either ({error})"
    )
