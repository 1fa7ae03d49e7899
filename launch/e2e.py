"""Private fine-tuning on E2E or DART (the recipe's ``data.task``), then generation and scores.

    python launch/e2e.py --recipe recipes/e2e/tiny_cpu.yaml [key=value ...]

Overrides use dotted keys for sections (``privacy.target_epsilon=3``) and plain keys for
top-level ones (``seed=1 max_steps=10 output_dir=outputs/try``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpllm.config import ConfigError, load_config  # noqa: E402
from dpllm.training.trainer import train  # noqa: E402
from dpllm.tasks.metrics import format_scores  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    summary = train(config)
    rows = [
        ("steps", summary["steps"]),
        ("epsilon (spent)", summary["epsilon"]),
        ("delta", summary["delta"]),
        ("noise multiplier", summary["noise_multiplier"]),
        ("sample rate", summary["sample_rate"]),
        ("eval loss before", summary["eval_loss_before"]),
        ("eval loss after", summary["eval_loss_after"]),
        ("train seconds", summary["train_seconds"]),
    ]
    print(f"\n{'result':<20} value")
    for name, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{name:<20} {shown}")
    if summary.get("scores"):
        print(f"\n{config.data.task.upper()} scores on {config.data.eval_file} (step {summary['steps']}):")
        print(format_scores(summary["scores"]))
    print(f"\nmodel, metrics.jsonl, training.png and results.json in {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
