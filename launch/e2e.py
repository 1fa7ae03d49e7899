"""Private fine-tuning on E2E or DART (the recipe's ``data.task``), then generation and scores.

    python launch/e2e.py --recipe recipes/e2e/tiny_cpu.yaml [key=value ...]
    deepspeed --num_gpus 2 launch/e2e.py --config ds_configs/zero2.json --recipe R [key=value ...]
    deepspeed --num_gpus 2 launch/e2e.py --config ds_configs/zero2.json   (no --recipe: the tiny one)
    torchrun --nproc_per_node 2 launch/e2e.py --engine fsdp --recipe R [key=value ...]   (or --engine ddp)

On CPUs set DS_ACCELERATOR=cpu for DeepSpeed; processes talk over gloo there, NCCL on GPUs.

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


def main(argv: list[str] | None = None, default_recipe: str = "recipes/e2e/tiny_cpu.yaml") -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=default_recipe, help="YAML recipe (default: %(default)s, offline on CPU)")
    parser.add_argument("--config", help="DeepSpeed JSON config (selects the deepspeed engine)")
    parser.add_argument(
        "--engine", choices=["single", "ddp", "fsdp", "deepspeed"], help="default: deepspeed with --config, else single"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher; unused")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    engine = args.engine or ("deepspeed" if args.config else "single")
    if args.config and engine != "deepspeed":
        parser.error("--config is a DeepSpeed config: it needs --engine deepspeed")
    args.overrides = [f"engine={engine}"] + ([f"deepspeed_config={args.config}"] if args.config else []) + args.overrides
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    summary = train(config)
    if "eval_loss_after" not in summary:  # not rank 0
        return 0
    rows = [
        ("steps", summary["steps"]),
        ("epsilon (spent)", summary["epsilon"]),
        ("delta", summary["delta"]),
        ("noise multiplier", summary["noise_multiplier"]),
        ("sample rate", summary["sample_rate"]),
        ("eval loss before", summary["eval_loss_before"]),
        ("eval loss after", summary["eval_loss_after"]),
        *[(k.replace("_", " "), v) for k, v in summary.items() if k.startswith("eval_") and "loss" not in k],
        ("train seconds", summary["train_seconds"]),
    ]
    print(f"\n{'result':<20} value")
    for name, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{name:<20} {shown}")
    if summary.get("scores"):
        print(f"\n{config.data.task.upper()} scores on {config.data.eval_file} (step {summary['steps']}):")
        print(format_scores(summary["scores"]))
    print(f"\nin {config.output_dir}: publishable final/ (model, privacy.json, PRIVACY.md), metrics.jsonl, training.png, "
          "results.json; NOT private (keep with the training data): diagnostics/, checkpoints/")
    if not summary["seed_secret"]:
        print("privacy.noise_seed was fixed: the epsilon above holds only while that number stays secret")
    return 0


if __name__ == "__main__":
    sys.exit(main())
