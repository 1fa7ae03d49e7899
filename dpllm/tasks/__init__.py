"""Data-to-text tasks: data, formatting and evaluation. Task code never imports the privacy code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dpllm.tasks import dart, e2e
from dpllm.tasks.metrics import dart_scores, e2e_scores


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable  # (file, folder or hub name, split, max_examples) -> list[Example]
    score: Callable  # (predictions, references) -> dict of metric -> value
    primary_metric: str = "bleu"


TASKS = {
    "e2e": Task("e2e", e2e.load, e2e_scores),
    "dart": Task("dart", dart.load, dart_scores),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]
