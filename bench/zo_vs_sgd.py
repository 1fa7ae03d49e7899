"""DP zeroth-order (algorithm=dp_zo) against DP-SGD (book-keeping clipping): memory and results.

    python bench/zo_vs_sgd.py                                  # both parts, defaults below
    python bench/zo_vs_sgd.py --parts memory --model smol-llama-220m
    python bench/zo_vs_sgd.py --parts quality --tasks e2e --epsilons 8

memory   one step on a model built from a published config (random weights, fp32, one process,
         micro-batch of 4 tiny-recipe rows): the process's peak minus its memory before the model
         was loaded, for a forward pass alone (no gradients), a dp_zo step and a dp_sgd step with
         AdamW, each in a fresh process (resident memory on CPU, glibc's mmap threshold at 128
         KiB so freed tensors leave it; ``max_memory_allocated`` on a GPU). Printed: each, and
         dp_zo / dp_sgd, dp_zo / forward.
quality  at equal epsilon and equal training wall-clock: DP-SGD runs its recipe; dp_zo gets as
         many steps as fit the DP-SGD run's training seconds (its time per step measured by a
         short run first), sigma calibrated to the same epsilon for them. Tasks: the tiny E2E
         recipe (BLEU of greedy generation on the first 50 dev inputs, eval loss) and the MiniLM
         SST-2 recipe (dev accuracy). Printed: the metric, steps, seconds per step, peak resident
         memory of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.memory import MODELS, save_model  # noqa: E402

MODES = ("forward", "dp_zo", "dp_sgd")
TASKS = {
    "e2e": dict(script="launch/e2e.py", recipe="recipes/e2e/tiny_cpu.yaml", metric="bleu",
                extra=["generation.every=0", "generation.num_beams=1", "generation.max_inputs=50", "eval_every=0"]),
    "sst2": dict(script="launch/glue.py", recipe="recipes/glue/minilm_sst2_cpu.yaml", metric="eval_accuracy", extra=[]),
}


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mb() -> float:
    import psutil
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


def step_worker(mode: str, model_dir: Path, out: Path) -> None:
    """One step of ``mode`` in this (fresh) process; writes {before_mb, peak_mb, seconds}."""
    import torch

    from dpllm.config import ModelConfig
    from dpllm.distributed.env import DistEnv
    from dpllm.models import load_model_and_tokenizer, pad_token_id
    from dpllm.privacy.accountant import PrivacyAccountant
    from dpllm.privacy.noise import GaussianNoise
    from dpllm.steps import MicroBatch, PrivateStep, StageSchedule, ZerothOrderStep
    from dpllm.training.objectives import objective_for

    objective = objective_for("e2e")
    rows = objective.load(str(REPO / "assets/data/e2e/train.csv"), "train", 4)
    device = DistEnv().device()
    # The rows are encoded with the embedded tokenizer (the bench models share it)
    _, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(REPO / "assets/models/stories260K")))
    examples = [objective.encode(row, tokenizer, 64)[0] for row in rows]
    batch = {k: v.to(device) for k, v in objective.collate(examples, pad_token_id(tokenizer)).items()}
    before = _current_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    model.to(device).train()
    noise = GaussianNoise(1.0, 1.0, seed=1)
    common = dict(max_grad_norm=1.0, noise=noise, noise_multiplier=1.0, sample_rate=0.01, expected_batch_size=4.0,
                  accountant=PrivacyAccountant(1e-5))
    started = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            objective.per_sample_loss(model, batch)
    elif mode == "dp_zo":
        step = ZerothOrderStep(model, env=DistEnv(), directions=1, schedule=StageSchedule(lr=1e-6, mu=1e-3), direction_seed=1,
                               **common)
        step.run([[MicroBatch(batch, padding=False)]], lambda b: objective.per_sample_loss(model, b))
        step.step()
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        step = PrivateStep(model, optimizer, clipper_options={"mode": "book_keeping"}, **common)
        step.clip_and_accumulate(objective.per_sample_loss(model, batch))
        step.step()
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    out.write_text(json.dumps({"before_mb": before, "peak_mb": _peak_mb(), "seconds": seconds, "parameters": params}))


def _env() -> dict:
    bin_dir = Path(sys.executable).parent
    return dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PATH=f"{bin_dir}:{os.environ['PATH']}",
                MALLOC_MMAP_THRESHOLD_=str(128 * 1024))


def memory(args) -> list[dict]:
    model_dir = save_model(args.model, args.out / "models" / args.model)
    result = {}
    for mode in MODES:
        path = args.out / f"step_{mode}.json"
        path.unlink(missing_ok=True)
        done = subprocess.run([sys.executable, __file__, "--step-worker", mode, str(model_dir), str(path)], cwd=REPO,
                              env=_env(), capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{mode} step failed:\n{done.stderr[-3000:]}")
        r = json.loads(path.read_text())
        result[mode] = {"mb": round(r["peak_mb"] - r["before_mb"], 1), "seconds": round(r["seconds"], 2), "parameters": r["parameters"]}
    row = {
        "model": args.model, "parameters": result["forward"]["parameters"],
        **{f"{mode}_mb": result[mode]["mb"] for mode in MODES},
        **{f"{mode}_s": result[mode]["seconds"] for mode in MODES},
        "zo_vs_sgd": round(result["dp_zo"]["mb"] / result["dp_sgd"]["mb"], 3),
        "zo_vs_forward": round(result["dp_zo"]["mb"] / result["forward"]["mb"], 3),
    }
    print(f"\none step, {args.model} ({row['parameters'] / 1e6:.0f}M parameters), memory above the process before the model:")
    print("| forward alone (MB) | dp_zo step (MB) | dp_sgd + AdamW step (MB) | dp_zo / dp_sgd | dp_zo / forward |")
    print("|---|---|---|---|---|")
    print(f"| {row['forward_mb']} | {row['dp_zo_mb']} | {row['dp_sgd_mb']} | {row['zo_vs_sgd']} | {row['zo_vs_forward']} |", flush=True)
    return [row]


def _run(task: str, out: Path, extra: list[str]) -> dict:
    """One training run as a user launches it; its summary and peak resident memory (sampled)."""
    import psutil

    spec = TASKS[task]
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, spec["script"], "--recipe", spec["recipe"], *spec["extra"], "progress=false", f"output_dir={out}", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        me = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], me.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    seconds = json.loads((out / "diagnostics/summary.json").read_text())["train_seconds"]  # the bench's own run
    return {**summary, "train_seconds": seconds, "peak_rss_mb": round(peak[0], 1)}


def _metric(task: str, summary: dict):
    if task == "e2e":
        return (summary.get("scores") or {}).get("bleu")
    return summary.get("eval_accuracy_after")


def quality(args) -> list[dict]:
    rows = []
    for task in args.tasks:
        for eps in args.epsilons:
            budget = [f"privacy.target_epsilon={eps}", f"seed={args.seed}", *args.extra]
            sgd = _run(task, args.out / f"{task}_eps{eps}_sgd", budget)
            probe = _run(task, args.out / f"{task}_eps{eps}_zo_probe", [*budget, "algorithm=dp_zo", f"max_steps={args.probe_steps}",
                                                                         "generation.at_end=false"])
            per_step = probe["train_seconds"] / probe["steps"]
            steps = max(1, int(sgd["train_seconds"] / per_step))
            zo = _run(task, args.out / f"{task}_eps{eps}_zo", [*budget, "algorithm=dp_zo", f"max_steps={steps}"])
            for name, s in (("dp_sgd", sgd), ("dp_zo", zo)):
                row = {"task": task, "epsilon": eps, "algorithm": name, "metric": TASKS[task]["metric"], "value": _metric(task, s),
                       "eval_loss": s["eval_loss_after"], "steps": s["steps"], "epsilon_spent": round(s["epsilon"], 4),
                       "seconds_per_step": round(s["train_seconds"] / s["steps"], 3), "train_seconds": s["train_seconds"],
                       "peak_rss_mb": s["peak_rss_mb"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| task | epsilon | algorithm | metric | value | eval loss | steps | s/step | train s | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.4g}"
        print(f"| {r['task']} | {r['epsilon']:g} | {r['algorithm']} | {r['metric']} | {value} | {r['eval_loss']:.4g} | "
              f"{r['steps']} | {r['seconds_per_step']} | {r['train_seconds']} | {r['peak_rss_mb']} |")
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--step-worker":
        step_worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["memory", "quality"], default=["memory", "quality"])
    parser.add_argument("--model", choices=sorted(MODELS), default="smol-llama-220m")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["e2e", "sst2"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[3.0, 8.0])
    parser.add_argument("--probe-steps", type=int, default=10, help="dp_zo steps timed to size its run to DP-SGD's wall-clock")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every quality run (the tests shorten them)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench_zo_vs_sgd")
    parser.add_argument("--results", type=Path, default=None, help="also write the rows to results.json in this folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if "memory" in args.parts:
        results["memory"] = memory(args)
    if "quality" in args.parts:
        results["quality"] = quality(args)
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
