"""Generate from a checkpoint and score it, or score an existing predictions file.

    python launch/evaluate.py --task e2e --checkpoint outputs/e2e_tiny_cpu/final --eval-file assets/data/e2e/dev.csv
    python launch/evaluate.py --task e2e --predictions preds.txt --eval-file assets/data/e2e/dev.csv

Predictions are one line per unique input of the eval file, in order of first appearance
(the order of ``inputs.txt`` written next to them). Writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpllm.tasks import TASKS, get_task  # noqa: E402
from dpllm.tasks.data2text import DataError, group_references, read_predictions  # noqa: E402
from dpllm.tasks.metrics import format_scores  # noqa: E402


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a save_pretrained folder (or hub name) to generate from")
    source.add_argument("--predictions", help="a file with one prediction per unique input")
    parser.add_argument("--eval-file", required=True, help="official file, folder of official files, or hub name")
    parser.add_argument("--split", default="validation", help="split, for folders and hub names")
    parser.add_argument("--max-inputs", type=_positive_int, default=None, help="score only the first k unique inputs")
    parser.add_argument("--num-beams", type=_positive_int, default=5, help="1 is greedy")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=100)
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--output-dir", help="default: next to the checkpoint or the predictions")
    args = parser.parse_args(argv)
    task = get_task(args.task)
    try:
        examples = task.load(args.eval_file, args.split)
    except DataError as e:
        parser.error(str(e))
    sources, references = group_references(examples)
    if args.max_inputs is not None:
        sources, references = sources[: args.max_inputs], references[: args.max_inputs]

    if args.predictions:
        out = Path(args.output_dir or Path(args.predictions).parent)
        try:
            predictions = read_predictions(args.predictions, len(sources))
        except DataError as e:
            parser.error(str(e))
    else:
        predictions, out = _generate(args, sources)
    out.mkdir(parents=True, exist_ok=True)
    scores = {k: float(v) for k, v in task.score(predictions, references).items()}
    results = {"task": args.task, "eval_file": args.eval_file, "inputs": len(sources), "scores": scores}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_scores(scores))
    print(f"\nresults.json in {out}")
    return 0


def _generate(args, sources: list[str]) -> tuple[list[str], Path]:
    from dpllm.config import ModelConfig
    from dpllm.generation import generate
    from dpllm.models import load_model_and_tokenizer
    from dpllm.tasks.data2text import prompt, write_lines

    out = Path(args.output_dir or Path(args.checkpoint).parent / f"eval_{args.task}")
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=args.checkpoint))
    predictions = generate(
        model,
        tokenizer,
        [prompt(s) for s in sources],
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_lines(out / "inputs.txt", sources)
    write_lines(out / "predictions.txt", predictions)
    return predictions, out


if __name__ == "__main__":
    sys.exit(main())
