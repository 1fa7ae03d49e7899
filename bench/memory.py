"""Per-rank peak memory of a private run at world sizes 1, 2 and 4, per engine.

    python bench/memory.py                        # smol_llama-220M-GQA's published config, random weights
    python bench/memory.py --model smollm-135m --worlds 1 2 --engines fsdp
    python bench/memory.py --lengths 1024 --worlds 1 2 --engines fsdp   # the sequence-length axis

Each run is the tiny E2E recipe (2 steps, expected batch 4 in micro-batches of 1, sequences of
at most 64 tokens, fixed noise multiplier) launched as a user would (torchrun for FSDP2, the DeepSpeed launcher
for ZeRO-3 and ZeRO-2). Every worker records its own peak (resident memory on CPU, torch's
``max_memory_allocated`` on a GPU) over the whole run, and over its training phase: from the
first micro-batch on (training, evaluation, saving), after loading, sharding and rank 0's
startup checks on the whole model. "Model memory" is the largest rank's peak minus the same
run's with the embedded 260K-parameter model, which removes what the process needs whatever the
model (interpreter, torch, data). Ratios are to the same engine on one process. On CPU, glibc's
mmap threshold is fixed at 128 KiB so that freed tensors leave the resident set (as they leave
``memory_allocated`` on a GPU) instead of staying in the heap, and the training phase's resident
memory is sampled every 10 ms.

The formula printed at the end is the memory the implementation keeps per parameter per rank
(fp32, AdamW), next to the training phase's measurement; it says what fits N devices of M GB.

``--lengths`` measures the sequence-length axis instead: for each T, micro-batches of 2 sequences
of T tokens (E2E rows whose references are repeated past T, cut at ``data.max_length=T``; the
same fixed noise seed throughout), AdamW (or ``--optims``), with and without
``model.gradient_checkpointing`` (``privacy.clipping=auto``: two_pass with it).
Printed per T, world size and optimizer:
model memory with and without, their ratio, the same for the training phase alone, and the
largest difference between the two runs' final parameters.

``--fit MB --from lengths*.json`` runs nothing: from saved ``--lengths`` results it prints, per
model, engine, world size and optimizer, the largest T whose model memory stays within MB per rank, with and
without checkpointing. It extends the line through the two largest measured T: memory grows
linearly in T once the activations (or checkpointing's recomputed layer) outgrow the fixed
state, as long as attention keeps no T x T matrix (PyTorch's fused attention does not); past
the measured range it is an extrapolation, which the table says.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Published configurations (Llama architecture), built with random weights: SmolLM (Hugging Face),
# smol_llama-101M-GQA and smol_llama-220M-GQA (BEE-spoke-data; untied embeddings, vocabulary 32128),
# MobileLLM-125M (Meta; deep and thin: 30 layers of 576, tied embeddings, vocabulary 32000)
MODELS = {
    "smol-llama-220m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=10, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=32128, tie_word_embeddings=False, rms_norm_eps=1e-6,
                            max_position_embeddings=2048),
    "smol-llama-101m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=24,
                            num_key_value_heads=8, vocab_size=32128, tie_word_embeddings=False, rms_norm_eps=1e-5,
                            max_position_embeddings=1024),
    "smollm-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
    "mobilellm-125m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=2048),
    "smollm-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                        num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
    # not a published model: the tests run the whole script on it in seconds
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256),
}
TINY_MODEL = "assets/models/stories260K"
TORCHRUN_ENGINES = ("fsdp", "ddp", "single")  # the others are ds_configs/ names
RUN = [
    "data.max_train_examples=200", "data.max_eval_examples=4", "eval_batch_size=1", "data.max_length=64", "batch_size=4",
    "micro_batch_size=1", "max_steps=2", "eval_every=0", "generation.every=0", "generation.at_end=false",
    "progress=false", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
]
# Bytes per parameter per rank the implementation keeps (fp32 weights, N ranks), and what it holds.
FORMULAS = {
    "fsdp": ("16/N", lambda n: 16 / n,
             "weights 4/N + gradient shards 4/N + AdamW 8/N; owned clipped sums 4/N live before the gradients exist"),
    "zero3": ("24/N", lambda n: 24 / n,
              "weights 4/N + fp32 master 4/N + AdamW 8/N + gradient partitions 4/N + owned clipped sums 4/N"),
    "zero2": ("8 + 16/N", lambda n: 8 + 16 / n,
              "weights 4 + the hand-over's replicated gradients 4 + fp32 master 4/N + AdamW 8/N + owned clipped sums 4/N"),
}


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(out: Path, argv: list[str]) -> None:
    """Run launch/e2e.py in this process, then record this rank's peaks: before the first
    micro-batch (loading, sharding, the startup checks) and after it (training, evaluation,
    saving; on CPU resident memory sampled every 10 ms from then on)."""
    import threading

    import psutil
    import torch

    from dpllm.steps.private import PrivateStep
    from launch.e2e import main

    phase = {"training_mb": 0.0}
    first = PrivateStep.clip_and_accumulate

    def sample() -> None:
        me = psutil.Process()
        while True:
            phase["training_mb"] = max(phase["training_mb"], me.memory_info().rss / 2**20)
            time.sleep(0.01)

    def clip_and_accumulate(self, loss):
        if "setup_mb" not in phase:
            phase["setup_mb"] = _peak_mb()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            else:
                threading.Thread(target=sample, daemon=True).start()
        return first(self, loss)

    PrivateStep.clip_and_accumulate = clip_and_accumulate
    code = main(argv)
    if torch.cuda.is_available():
        phase["training_mb"] = torch.cuda.max_memory_allocated() / 2**20
    peak = {"rank": int(os.environ.get("RANK", "0")), "measure": "cuda_mb" if torch.cuda.is_available() else "rss_mb",
            "peak_mb": max(_peak_mb(), phase["training_mb"]), "setup_mb": phase.get("setup_mb", 0.0),
            "training_mb": phase["training_mb"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peak_rank{peak['rank']}.json").write_text(json.dumps(peak))
    sys.exit(code)


def save_model(name: str, folder: Path, context: int = 0) -> Path:
    """The published config with random weights (and the embedded tokenizer), saved once.
    ``context``: a longer max_position_embeddings than the published one (rotary positions have no
    table, so only the config's number changes; the weights are the same)."""
    published = MODELS[name]["max_position_embeddings"]
    if context > published:
        folder = folder.with_name(f"{folder.name}_ctx{context}")
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(REPO / TINY_MODEL)
    fields = dict(MODELS[name], max_position_embeddings=max(published, context))
    config = LlamaConfig(**fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def long_rows(folder: Path, length: int, tokenizer_folder: Path) -> Path:
    """The embedded E2E training rows with each reference repeated until it is at least ``length`` tokens."""
    import csv

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train_T{length}.csv"
    with open(REPO / "assets/data/e2e/train.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        ref = row["ref"]
        while len(tok(ref)["input_ids"]) < length:
            ref = f"{ref} {row['ref']}"
        row["ref"] = ref
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["mr", "ref"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _free_port() -> int:
    """A port no other run on this machine holds now (two benchmarks may run at once)."""
    from dpllm.distributed.local import free_port

    return free_port()


def launch(engine: str, world: int, model: Path, optim: str, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """One run's peaks over its ranks, or ``{"error": ...}`` when it failed (say, killed for memory)."""
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    args = ["--recipe", "recipes/e2e/tiny_cpu.yaml", *RUN, f"model.name_or_path={model}", f"optim.name={optim}",
            f"output_dir={out / 'run'}", *extra]
    me = ["bench/memory.py", "--worker", str(out / "peaks")]
    if engine in TORCHRUN_ENGINES:
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(port), *me, "--",
               "--engine", engine, *args]
    else:
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(world), "--master_port", str(port), *me, "--",
               "--config", f"ds_configs/{engine}.json", *args]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PATH=f"{bin_dir}:{os.environ['PATH']}",
               OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    shutil.rmtree(out, ignore_errors=True)  # no peak or output of an earlier run is read back
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        killed = "exits with return code = -9" in done.stdout + done.stderr or "exitcode  : -9" in done.stderr
        print(f"{' '.join(cmd)} failed:\n{done.stdout[-1000:]}\n{done.stderr[-2000:]}", file=sys.stderr)
        return {"error": "a rank was killed (SIGKILL: out of memory?)" if killed else f"exit code {done.returncode}"}
    peaks = [json.loads(p.read_text()) for p in sorted((out / "peaks").glob("peak_rank*.json"))]
    return {
        "peak_mb": max(p["peak_mb"] for p in peaks), "setup_mb": max(p["setup_mb"] for p in peaks),
        "training_mb": max(p["training_mb"] for p in peaks), "measure": peaks[0]["measure"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smol-llama-220m")
    parser.add_argument("--engines", nargs="+", choices=sorted(FORMULAS) + ["ddp", "single"], default=["fsdp", "zero3", "zero2"],
                        help="ddp and single (one process) only with --lengths")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--optims", nargs="+", choices=["adamw", "sgd"], default=None,
                        help="default: both for the per-rank table, AdamW for --lengths")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench_memory")
    parser.add_argument("--results", type=Path, default=None, help="also write the rows to results.json in this folder")
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], default="fp32",
                        help="the per-rank table's precision (bf16-mixed: FSDP2 gathers its units in bf16; "
                             "DeepSpeed's config decides for its engines)")
    parser.add_argument("--lengths", nargs="+", type=int, default=None, help="measure the sequence-length axis at these T")
    parser.add_argument("--fit", type=float, default=None, metavar="MB",
                        help="no run: the largest T within MB of model memory per rank, from the --from results")
    parser.add_argument("--from", dest="sources", nargs="+", type=Path, default=[], help="lengths.json files (with --fit)")
    args = parser.parse_args()
    if args.fit is not None:
        saved = [json.loads(path.read_text()) for path in args.sources]
        rows = [{**r, "model": data["model"]} for data in saved for r in data["rows"] if "error" not in r]
        if not rows:
            parser.error("--fit needs --from with at least one lengths.json that has measured rows")
        _print_table(
            ["model", "engine", "processes", "optimizer", "measured T",
             f"largest T within {args.fit:g} MB: without checkpointing", "with checkpointing"],
            largest_lengths(rows, args.fit), ["model", "engine", "world", "optim", "measured"], ["without", "with"],
        )
        return
    from transformers import AutoConfig

    model = save_model(args.model, args.out / "models" / args.model, context=max(args.lengths or [0]))
    cfg = AutoConfig.from_pretrained(model)
    params = _count(model)
    print(f"{args.model}: {params / 1e6:.1f}M parameters (config {cfg.hidden_size}x{cfg.num_hidden_layers}, vocab {cfg.vocab_size})")
    if args.lengths:
        sequence_lengths(args, model)
        return
    if not set(args.engines) <= set(FORMULAS):
        parser.error(f"--engines: the per-rank table measures {', '.join(sorted(FORMULAS))}")
    rows = []
    for engine in args.engines:
        optims = (args.optims or ["adamw", "sgd"]) if engine == "fsdp" else ["adamw"]  # ZeRO's partitions are the optimizer's
        for optim in optims:
            base = {}
            for world in args.worlds:
                tag = f"{engine}_{optim}_w{world}"
                extra = (f"precision={args.precision}",)
                big = launch(engine, world, model, optim, args.out / tag, extra)
                small = launch(engine, world, REPO / TINY_MODEL, optim, args.out / (tag + "_tiny"), extra)
                if "error" in big or "error" in small:
                    rows.append({"engine": engine, "optim": optim, "world": world, "error": big.get("error") or small["error"]})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                model_mb = big["peak_mb"] - small["peak_mb"]
                training_mb = big["training_mb"] - small["training_mb"]
                base.setdefault("model_mb", model_mb)
                base.setdefault("training_mb", training_mb)
                row = {
                    "engine": engine, "optim": optim, "world": world, "precision": args.precision, "peak_mb": round(big["peak_mb"]),
                    "baseline_mb": round(small["peak_mb"]), "model_mb": round(model_mb),
                    "ratio_to_one": round(model_mb / base["model_mb"], 3) if base["model_mb"] > 0 else None,
                    "bytes_per_param": round(model_mb * 2**20 / params, 1), "measure": big["measure"],
                    "training_model_mb": round(training_mb),
                    "training_ratio_to_one": round(training_mb / base["training_mb"], 3) if base["training_mb"] > 0 else None,
                    "training_bytes_per_param": round(training_mb * 2**20 / params, 1),
                    "setup_peak_mb": round(big["setup_mb"]),
                    "seconds": big["seconds"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    _print_table(
        ["engine", "optimizer", "processes", "peak per rank (MB)", "model memory (MB)", "vs 1 process", "bytes/param/rank",
         "training phase: model memory (MB)", "vs 1 process", "bytes/param/rank"],
        rows, ["engine", "optim", "world"],
        ["peak_mb", "model_mb", "ratio_to_one", "bytes_per_param", "training_model_mb", "training_ratio_to_one",
         "training_bytes_per_param"],
    )
    print("\nformula (fp32, AdamW), bytes per parameter per rank, against the training phase's measurement:")
    for engine in args.engines:
        text, f, parts = FORMULAS[engine]
        measured = {r["world"]: r["training_bytes_per_param"] for r in rows
                    if r["engine"] == engine and r["optim"] == "adamw" and "error" not in r}
        print(f"  {engine}: {text} ({parts}); " + ", ".join(f"N={n}: {f(n):.1f} formula, {b} measured" for n, b in measured.items()))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "results.json").write_text(json.dumps({"model": args.model, "parameters": params, "rows": rows}, indent=2))


def sequence_lengths(args, model: Path) -> None:
    """Model memory with and without activation checkpointing per T, and the final parameters' difference."""
    from safetensors.torch import load_file

    rows = []
    for length in args.lengths:
        data = long_rows(args.out / "data", length, model)
        common = (f"data.train_file={data}", f"data.max_length={length}", "batch_size=2", "micro_batch_size=2",
                  "seed=1", "privacy.noise_seed=1")
        for engine, world, optim in itertools.product(args.engines, args.worlds, args.optims or ["adamw"]):
            runs = {}
            for flag in ("false", "true"):
                tag = f"T{length}_{engine}_w{world}_{optim}_ckpt_{flag}"
                extra = (*common, f"model.gradient_checkpointing={flag}")
                big = launch(engine, world, model, optim, args.out / tag, extra)
                small = launch(engine, world, REPO / TINY_MODEL, optim, args.out / (tag + "_tiny"), extra)
                if "error" in big or "error" in small:
                    runs = {"error": big.get("error") or small["error"]}
                    break
                clipping = json.loads((args.out / tag / "run/summary.json").read_text())["clipping"]
                runs[flag] = {"model_mb": big["peak_mb"] - small["peak_mb"], "clipping": clipping,
                              "training_mb": big["training_mb"] - small["training_mb"],
                              "params": load_file(args.out / tag / "run/final/model.safetensors")}
            if "error" in runs:
                row = {"T": length, "engine": engine, "world": world, "optim": optim, "error": runs["error"]}
            else:
                off, on = runs["false"], runs["true"]
                diff = float(f'{max(float((on["params"][k] - v).abs().max()) for k, v in off["params"].items()):.1e}')
                row = {"T": length, "engine": engine, "world": world, "optim": optim, "without_mb": round(off["model_mb"]),
                       "with_mb": round(on["model_mb"]), "ratio": round(on["model_mb"] / max(off["model_mb"], 1), 3),
                       "training_without_mb": round(off["training_mb"]), "training_with_mb": round(on["training_mb"]),
                       "training_ratio": round(on["training_mb"] / max(off["training_mb"], 1), 3),
                       "clipping_with": on["clipping"], "max_param_diff": diff}
            rows.append(row)
            print(json.dumps(row), flush=True)
    _print_table(
        ["T", "engine", "processes", "optimizer", "model memory without (MB)", "with checkpointing (MB)", "with / without",
         "training phase: without (MB)", "with (MB)", "with / without", "clipping with", "largest parameter difference"],
        rows, ["T", "engine", "world", "optim"],
        ["without_mb", "with_mb", "ratio", "training_without_mb", "training_with_mb", "training_ratio", "clipping_with",
         "max_param_diff"],
    )
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "lengths.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


def largest_lengths(rows: list[dict], budget_mb: float) -> list[dict]:
    """Per (model, engine, world, optimizer): the largest T whose model memory is within
    ``budget_mb``, with and without checkpointing, on the line through the two largest measured T
    (see the docstring). Rows without an optimizer are AdamW's (the axis measured only AdamW before)."""
    out = []

    def group_of(r: dict) -> tuple:
        return r.get("model", ""), r["engine"], r["world"], r.get("optim", "adamw")

    for group in sorted({group_of(r) for r in rows}):
        points = sorted(((r["T"], r) for r in rows if group_of(r) == group), key=lambda point: point[0])
        model, engine, world, optim = group
        row = {"model": model, "engine": engine, "world": world, "optim": optim,
               "measured": ", ".join(str(t) for t, _ in points)}
        for key, column in (("without", "without_mb"), ("with", "with_mb")):
            if len(points) < 2:
                row[key] = "needs two T"
                continue
            (t1, r1), (t2, r2) = points[-2], points[-1]
            slope = (r2[column] - r1[column]) / (t2 - t1)
            if slope <= 0:
                row[key] = "no growth measured"
                continue
            t = int(t2 + (budget_mb - r2[column]) / slope)
            row[key] = "below the measured range" if t < t1 else f"{t} (extrapolated)" if t > t2 else str(t)
        out.append(row)
    return out


def _print_table(columns: list[str], rows: list[dict], keys: list[str], values: list[str]) -> None:
    """A markdown table; a failed run's row is its ``keys`` and its error."""
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [r["error"]] + [""] * (len(values) - 1) if "error" in r else [r[k] for k in values]
        print("| " + " | ".join(str(c) for c in [r[k] for k in keys] + cells) + " |")


def _count(folder: Path) -> int:
    """Parameters stored in a saved model (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the DeepSpeed launcher adds it
    if argv[:1] == ["--worker"]:
        worker(Path(argv[1]), argv[3:] if argv[2:3] == ["--"] else argv[2:])
    main()
