"""Does RMT denoising make private fine-tuning learn in fewer steps? Baseline vs denoised.

    python bench/sample_efficiency.py --size cpu [--sweep] [--out outputs/sample_efficiency]
    python bench/sample_efficiency.py --size gpu --e2e-train E2E/trainset.csv --e2e-dev E2E/devset.csv

1. Public pretraining (no privacy): a Llama with 512-wide layers (cpu size; 1024 on gpu)
   learns language from DART texts (assets/data/dart), so that the private phase is a
   fine-tune of a model that already knows English, as in practice.
2. Private fine-tuning on E2E at epsilon 8 and 3, several seeds, with and without denoising
   (same seeds: same Poisson samples and the same noise draws), eval loss every few steps.
   The denoised runs log the research diagnostic cos(denoised, clipped) - cos(noisy, clipped)
   (not private; fine for a benchmark on public data).
3. Table: steps each variant needs to reach 90% and 95% of the baseline's final eval-loss
   gain (mean over seeds); plots of eval loss vs steps and of the improvement curve.
``--sweep`` adds batch-size and noise-multiplier variations at one seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dpllm.config import load_config  # noqa: E402
from dpllm.training.metrics import read_logs  # noqa: E402
from dpllm.training.trainer import train  # noqa: E402


@dataclass
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    pretrain_steps: int
    pretrain_batch: int
    seq: int
    steps: int
    batch: int
    eval_every: int
    eval_examples: int
    train_examples: int | None
    seeds: int
    max_length: int


# Denoising only acts once a matrix's summed clipped gradient rises above the noise bulk,
# which takes large logical batches: the cpu size uses batch 512 with short sequences.
# "smoke" runs the whole script in seconds (the tests use it); its numbers mean nothing.
SIZES = {
    "cpu": Size(512, 1376, 1, 8, 300, 32, 96, 15, 512, 3, 100, None, 3, 64),
    "gpu": Size(1024, 2752, 4, 16, 3000, 64, 128, 400, 1024, 20, 500, None, 3, 128),
    "smoke": Size(64, 172, 1, 2, 3, 8, 32, 4, 32, 2, 16, 256, 1, 64),
}
TOKENIZER = REPO / "assets/models/stories260K"


def dart_texts(path: Path) -> list[str]:
    entries = json.loads(path.read_text(encoding="utf-8"))
    return [a["text"].strip() for e in entries for a in e.get("annotations", []) if a.get("text", "").strip()]


def pretrain(size: Size, out: Path, dart: Path, seed: int = 0) -> Path:
    """Non-private language-model pretraining on public DART text; cached in ``out``."""
    target = out / "pretrained"
    if (target / "config.json").exists():
        return target
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    stream = []
    for text in dart_texts(dart):
        stream.extend(tok(text)["input_ids"] + [tok.eos_token_id])
    blocks = torch.tensor(stream[: len(stream) // size.seq * size.seq]).view(-1, size.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=size.pretrain_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(size.pretrain_steps):
        batch = blocks[torch.randint(0, len(blocks), (size.pretrain_batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == size.pretrain_steps - 1:
            print(f"  pretrain step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target


def fine_tune(model_dir: Path, out: Path, size: Size, args, *, epsilon=None, sigma=None, denoise: bool, seed: int, batch=None):
    overrides = [
        f"model.name_or_path={model_dir}",
        f"data.train_file={args.e2e_train}",
        f"data.eval_file={args.e2e_dev}",
        f"data.max_eval_examples={size.eval_examples}",
        f"data.max_length={size.max_length}",
        f"batch_size={batch or size.batch}",
        f"micro_batch_size={min(batch or size.batch, 128)}",
        f"max_steps={size.steps}",
        f"eval_every={size.eval_every}",
        "log_every=1",  # every step, so that denoising statistics are complete
        f"seed={seed}",
        f"privacy.noise_seed={seed}",  # seed-matched variants: the same samples and noise draws
        f"output_dir={out}",
        "progress=false",
        "optim.lr=0.001",
        f"denoise.enabled={str(denoise).lower()}",
        f"denoise.diagnostics={str(denoise).lower()}",
        "generation.every=0",  # the comparison is on eval loss; beam search would only cost time
        "generation.at_end=false",
    ]
    if size.train_examples:
        overrides.append(f"data.max_train_examples={size.train_examples}")
    if sigma is not None:
        overrides += ["privacy.target_epsilon=null", f"privacy.noise_multiplier={sigma}"]
    else:
        overrides.append(f"privacy.target_epsilon={epsilon}")
    summary = train(load_config(REPO / "recipes/e2e/tiny_cpu.yaml", overrides))
    rows = read_logs(out)
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    gains = {r["step"]: r["cos_gain"] for r in rows if "cos_gain" in r}
    denoised = [r["denoised_fraction"] for r in rows if "denoised_fraction" in r]
    return {"summary": summary, "eval": evals, "cos_gain": gains, "denoised_fraction": denoised}


def mean_curve(runs: list[dict], key: str) -> dict[int, float]:
    steps = sorted(set.intersection(*(set(r[key]) for r in runs)))
    return {s: sum(r[key][s] for r in runs) / len(runs) for s in steps}


def steps_to(curve: dict[int, float], level: float):
    for step in sorted(curve):
        if curve[step] <= level:
            return step
    return None


def plot(results: dict, path_loss: Path, path_gain: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = sorted({k[0] for k in results})
    fig, axes = plt.subplots(1, len(epsilons), figsize=(5 * len(epsilons), 3.8), squeeze=False)
    for ax, eps in zip(axes[0], epsilons):
        for variant, style in (("baseline", "-"), ("denoised", "--")):
            curve = mean_curve(results[(eps, variant)], "eval")
            ax.plot(list(curve), list(curve.values()), style, marker="o", markersize=3, label=variant)
        ax.set_title(f"epsilon {eps}")
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss (mean over seeds)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path_loss, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for eps in epsilons:
        curve = mean_curve(results[(eps, "denoised")], "cos_gain")
        ax.plot(list(curve), list(curve.values()), marker="o", markersize=3, label=f"epsilon {eps}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cos(denoised, clipped) - cos(noisy, clipped)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path_gain, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "outputs/sample_efficiency")
    ap.add_argument("--epsilons", default="8,3")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--dart", type=Path, default=REPO / "assets/data/dart/train_sample.json")
    ap.add_argument("--e2e-train", type=Path, default=REPO / "assets/data/e2e/train.csv")
    ap.add_argument("--e2e-dev", type=Path, default=REPO / "assets/data/e2e/dev.csv")
    args = ap.parse_args()
    size = SIZES[args.size]
    seeds = args.seeds or size.seeds
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[{args.size}] pretraining a {size.layers}-layer Llama, hidden {size.hidden}, on DART text", flush=True)
    model_dir = pretrain(size, args.out, args.dart)

    results: dict[tuple, list[dict]] = {}
    for eps in [float(e) for e in args.epsilons.split(",")]:
        for variant in ("baseline", "denoised"):
            for seed in range(seeds):
                run_dir = args.out / "runs" / f"eps{eps:g}_{variant}_seed{seed}"
                r = fine_tune(model_dir, run_dir, size, args, epsilon=eps, denoise=variant == "denoised", seed=seed)
                results.setdefault((eps, variant), []).append(r)
                print(f"  eps {eps:g} {variant:<9} seed {seed}: eval loss {r['summary']['eval_loss_before']:.3f} -> "
                      f"{r['summary']['eval_loss_after']:.3f} ({time.perf_counter() - started:.0f}s)", flush=True)

    lines = ["| epsilon | variant | steps to 90% | steps to 95% | final eval loss | mean cos gain | denoised fraction |",
             "|---|---|---|---|---|---|---|"]
    table = []
    for eps in sorted({k[0] for k in results}, reverse=True):
        base = mean_curve(results[(eps, "baseline")], "eval")
        start_loss, final = base[min(base)], base[max(base)]
        gain = start_loss - final
        for variant in ("baseline", "denoised"):
            curve = mean_curve(results[(eps, variant)], "eval")
            row = {
                "epsilon": eps,
                "variant": variant,
                "steps_to_90": steps_to(curve, start_loss - 0.9 * gain),
                "steps_to_95": steps_to(curve, start_loss - 0.95 * gain),
                "final_eval_loss": curve[max(curve)],
            }
            if variant == "denoised":
                g = mean_curve(results[(eps, variant)], "cos_gain")
                row["mean_cos_gain"] = sum(g.values()) / len(g)
                fr = [f for r in results[(eps, variant)] for f in r["denoised_fraction"]]
                row["denoised_fraction"] = sum(fr) / len(fr)
            table.append(row)
            fmt = lambda v: "not reached" if v is None else str(v)  # noqa: E731
            gain_cells = f"{row['mean_cos_gain']:+.4f} | {row['denoised_fraction']:.2f}" if variant == "denoised" else " | "
            lines.append(
                f"| {eps:g} | {variant} | {fmt(row['steps_to_90'])} | {fmt(row['steps_to_95'])} | "
                f"{row['final_eval_loss']:.4f} | {gain_cells} |"
            )

    if args.sweep:
        lines += ["", "Sweep (epsilon 8 unless sigma is given; seed 0; final eval loss):", "",
                  "| setting | baseline | denoised | mean cos gain |", "|---|---|---|---|"]
        settings = [("batch 128", dict(epsilon=8.0, batch=128)), ("batch 1024", dict(epsilon=8.0, batch=1024)),
                    ("sigma 0.3", dict(sigma=0.3)), ("sigma 1.5", dict(sigma=1.5))]
        for label, kw in settings:
            pair = {}
            for variant in ("baseline", "denoised"):
                run_dir = args.out / "sweep" / f"{label.replace(' ', '')}_{variant}"
                pair[variant] = fine_tune(model_dir, run_dir, size, args, denoise=variant == "denoised", seed=0, **kw)
            g = pair["denoised"]["cos_gain"]
            lines.append(f"| {label} | {pair['baseline']['summary']['eval_loss_after']:.4f} | "
                         f"{pair['denoised']['summary']['eval_loss_after']:.4f} | {sum(g.values()) / len(g):+.4f} |")

    plot(results, args.out / "eval_loss.png", args.out / "improvement.png")
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(table, indent=2))
    print("\n" + text)
    print(f"\nplots: {args.out / 'eval_loss.png'}, {args.out / 'improvement.png'}; {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
