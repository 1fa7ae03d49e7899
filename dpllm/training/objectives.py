"""What training optimises and how it is evaluated, per kind of task.

A causal-LM objective (E2E, DART: target-token loss) or a sequence-classification objective
(GLUE: cross-entropy; accuracy, and F1 for QQP): how rows become examples, batches, per-sample
losses and evaluation numbers. The training loop is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from dpllm import classification, lm
from dpllm.tasks import get_task, glue
from dpllm.tasks.data2text import tokenize
from dpllm.training.evaluation import evaluate_loss


@dataclass(frozen=True)
class Objective:
    load: Callable  # (file, folder or hub name, split, max_examples) -> rows
    encode: Callable  # (row, tokenizer, max_length) -> (example, truncated)
    collate: Callable  # (examples, pad_id) -> batch
    per_sample_loss: Callable  # (model, batch) -> (B,) losses
    evaluate: Callable  # (model, examples, pad_id, batch_size) -> {"eval_loss": ..., ...}
    num_labels: int | None = None  # sequence classification only


def _lm_evaluate(model, examples, pad_id, batch_size) -> dict:
    return {"eval_loss": evaluate_loss(model, examples, pad_id, batch_size)}


def _classification_evaluate(task: str):
    def evaluate(model, examples, pad_id, batch_size) -> dict:
        loss, predictions = classification.evaluate(model, examples, pad_id, batch_size)
        metrics = glue.scores(predictions, [e["label"] for e in examples], task)
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in metrics.items()}}

    return evaluate


def objective_for(task: str) -> Objective:
    if task in glue.GLUE:
        return Objective(
            load=partial(glue.load, task),
            encode=glue.encode,
            collate=classification.collate,
            per_sample_loss=classification.forward_per_sample_loss,
            evaluate=_classification_evaluate(task),
            num_labels=len(glue.GLUE[task].labels),
        )
    return Objective(
        load=get_task(task).load,
        encode=tokenize,
        collate=lm.collate,
        per_sample_loss=lm.forward_per_sample_loss,
        evaluate=_lm_evaluate,
    )
