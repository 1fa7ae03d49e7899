"""The denoising paper's main table at CPU scale: MiniLM on SST-2 (and QNLI), baseline vs denoised.

    python bench/paper_table.py [--seeds 0,1,2] [--epsilons 3,8] [--qnli DIR] [--out outputs/paper_table]

Every run is recipes/glue/minilm_sst2_cpu.yaml (QNLI: the same settings on the folder given with
--qnli, a GLUE-layout folder or a k-shot root whose subsets are pooled) with a fixed seed, once
without and once with denoising; dev accuracy is evaluated at step 0 and every --eval-every
steps. Per task and epsilon the script reports, averaged over seeds: the accuracy before
training, the best dev accuracy either variant reaches, the steps each needs to reach 90% and 95%
of it, the final accuracy, the fraction of matrices denoised, and it plots the per-step cosine
improvement cos(denoised, clipped) - cos(noisy, clipped). That curve comes from denoise.diagnostics,
which reads the pre-noise gradient: it is a research measurement, NOT private, and it does not
change what is trained.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dpllm.config import load_config  # noqa: E402
from dpllm.training.metrics import read_logs  # noqa: E402
from dpllm.training.trainer import train  # noqa: E402

RECIPE = REPO / "recipes/glue/minilm_sst2_cpu.yaml"


def qnli_folder(source: Path, out: Path) -> Path:
    """A GLUE-layout QNLI folder as is, or a pool built from a k-shot root.

    A k-shot root (subfolders such as 512-13/ each holding train/dev/test.tsv drawn from GLUE
    train, and one shared test.tsv drawn from GLUE dev) is pooled: every subset's train and dev
    rows, deduplicated by their GLUE index, become train.tsv; the shared test.tsv becomes dev.tsv.
    One subset alone (1,024 rows) would make a batch of 512 half the data, a sampling rate at
    which private training learns nothing useful.
    """
    if (source / "train.tsv").is_file():
        return source
    subsets = sorted(p for p in source.iterdir() if (p / "train.tsv").is_file())
    if not subsets:
        raise SystemExit(f"--qnli {source}: neither train.tsv nor subfolders holding one")
    tests = {(p / "test.tsv").read_bytes() for p in subsets}
    if len(tests) != 1:
        raise SystemExit(f"--qnli {source}: the subsets' test.tsv files differ; pass one subset folder instead")
    header, rows = None, {}
    for subset in subsets:
        for name in ("train.tsv", "dev.tsv"):
            lines = (subset / name).read_text(encoding="utf-8").splitlines()
            header = header or lines[0]
            for line in lines[1:]:
                rows.setdefault(line.split("\t", 1)[0], line)
    pool = out / "qnli_pool"
    pool.mkdir(parents=True, exist_ok=True)
    (pool / "train.tsv").write_text("\n".join([header, *rows.values()]) + "\n", encoding="utf-8")
    (pool / "dev.tsv").write_bytes(tests.pop())
    print(f"QNLI pool: {len(rows)} training rows from {len(subsets)} subsets; dev = their shared test.tsv")
    return pool


def run(task: str, data: str, epsilon: float, seed: int, denoise: bool, args) -> list[dict]:
    out = Path(args.out) / f"{task}_eps{epsilon:g}_seed{seed}_{'denoised' if denoise else 'baseline'}"
    overrides = [
        f"data.task={task}", f"data.train_file={data}", f"data.eval_file={data}",
        f"privacy.target_epsilon={epsilon}", f"seed={seed}", f"privacy.noise_seed={seed}", f"max_steps={args.steps}",
        f"eval_every={args.eval_every}", "log_every=1", f"output_dir={out}", "progress=false",
        f"denoise.enabled={'true' if denoise else 'false'}", f"denoise.diagnostics={'true' if denoise else 'false'}",
        *args.override,
    ]
    if not (out / "summary.json").is_file():
        train(load_config(RECIPE, overrides))
    return read_logs(out)


def steps_to(rows: list[dict], level: float) -> int | None:
    return next((r["step"] for r in rows if r.get("eval_accuracy", -1) >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epsilons", default="3,8")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--qnli", type=Path, help="a QNLI folder (train.tsv, dev.tsv), or a k-shot root to pool")
    parser.add_argument("--out", default="outputs/paper_table")
    parser.add_argument("--override", nargs="*", default=[], help="extra recipe overrides for every run")
    args = parser.parse_args()
    tasks = [("sst2", str(REPO / "assets/data/glue/SST-2"))] + ([("qnli", str(qnli_folder(args.qnli, Path(args.out))))] if args.qnli else [])
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = ["| task | epsilon | variant | acc at step 0 | best acc | steps to 90% | steps to 95% | final acc | fraction denoised |",
             "|---|---|---|---|---|---|---|---|---|"]
    curves = {}
    for task, data in tasks:
        for eps in (float(e) for e in args.epsilons.split(",")):
            runs = {v: [run(task, data, eps, s, v == "denoised", args) for s in seeds] for v in ("baseline", "denoised")}
            for variant, per_seed in runs.items():
                s90, s95, start, final, best_list, frac = [], [], [], [], [], []
                for seed_index, rows in enumerate(per_seed):
                    other = runs["denoised" if variant == "baseline" else "baseline"][seed_index]
                    best = max(r.get("eval_accuracy", 0) for r in rows + other)
                    s90.append(steps_to(rows, 0.9 * best))
                    s95.append(steps_to(rows, 0.95 * best))
                    evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
                    start.append(evals[0])
                    final.append(evals[-1])
                    best_list.append(max(evals))
                    frac += [r["denoised_fraction"] for r in rows if "denoised_fraction" in r]
                    if variant == "denoised":
                        curves.setdefault((task, eps), []).append([(r["step"], r["cos_gain"]) for r in rows if "cos_gain" in r])

                def mean_steps(xs):
                    reached = [x for x in xs if x is not None]
                    return f"{statistics.mean(reached):.1f} ({len(reached)}/{len(xs)} seeds)" if reached else "not reached"

                lines.append(
                    f"| {task} | {eps:g} | {variant} | {statistics.mean(start):.3f} | {statistics.mean(best_list):.3f} | {mean_steps(s90)} | {mean_steps(s95)} | "
                    f"{statistics.mean(final):.3f} | {statistics.mean(frac) if frac else 0:.3f} |"
                )
    table = "\n".join(lines)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(table + "\n")
    _plot(curves, Path(args.out) / "cos_gain.png")


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, ((task, eps), seeds) in enumerate(curves.items()):
        for i, pts in enumerate(seeds):
            label = f"{task} eps {eps:g} ({len(seeds)} seeds)" if i == 0 else None
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{k}", label=label, alpha=0.6)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cos(denoised) - cos(noisy), vs clipped (not private)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
