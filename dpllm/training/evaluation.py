"""Evaluation during and after training: target-token loss, and generation scored by the task."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpllm.config import GenerationConfig
from dpllm.generation import generate
from dpllm.lm import IGNORE_INDEX, collate, per_sample_loss
from dpllm.tasks import Task
from dpllm.tasks.data2text import Example, group_references, prompt, write_lines, write_references


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean next-token loss on the examples' target tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
        total += float((per_sample_loss(logits, batch["labels"]) * counts).sum())
        tokens += int(counts.sum())
    model.train(was_training)
    return total / max(tokens, 1)


class GenerationEval:
    """Generates one output per unique eval input and scores it against all of that input's references.

    Writes ``inputs.txt`` and ``references.txt`` (blank line between inputs) once, and
    ``predictions_step{N}.txt`` (one line per input, same order) at every evaluation.
    """

    def __init__(
        self, task: Task, examples: list[Example], config: GenerationConfig, output_dir: str | Path,
        write: bool = True, synced: bool = False,
    ) -> None:
        """``write=False``: generate only (a rank of a sharded model, stepping the forward in
        lockstep with the others, ``synced``); the writing rank saves and scores."""
        self.task, self.config, self.write, self.synced = task, config, write, synced
        self.sources, self.references = group_references(examples)
        if config.max_inputs is not None:
            self.sources, self.references = self.sources[: config.max_inputs], self.references[: config.max_inputs]
        self.dir = Path(output_dir)
        if write:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_lines(self.dir / "inputs.txt", self.sources)
            write_references(self.dir / "references.txt", self.references)

    def __call__(self, model, tokenizer, step: int, progress: bool = False) -> dict[str, float]:
        c = self.config
        predictions = generate(
            model,
            tokenizer,
            [prompt(s) for s in self.sources],
            num_beams=c.num_beams,
            max_new_tokens=c.max_new_tokens,
            batch_size=c.batch_size,
            progress=progress and self.write,
            synced=self.synced,
        )
        if not self.write:
            return {}
        write_lines(self.dir / f"predictions_step{step}.txt", predictions)
        return {k: float(v) for k, v in self.task.score(predictions, self.references).items()}


def write_results(path: Path, scores: dict, **context) -> None:
    path.write_text(json.dumps({**context, "scores": scores}, indent=2))
