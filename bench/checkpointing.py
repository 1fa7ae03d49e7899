"""Peak memory of one clipped backward with and without activation checkpointing, per sequence length.

    python bench/checkpointing.py                      # 12 layers, hidden 512 (47M parameters), T = 256, 1024
    python bench/checkpointing.py --lengths 256 1024 4096 --batch 2

Each measurement runs in a fresh process: a Llama with random weights (train mode), one batch of
``--batch`` random sequences of T tokens, forward and the clipper's backward (book-keeping, the
clipped sums dropped as formed), once with Hugging Face's non-reentrant checkpointing and once
without. Printed: the peak resident memory above what the process held before the forward
(sampled every 5 ms; glibc's mmap threshold fixed at 128 KiB so that freed tensors leave the
resident set), and the ratio with / without, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "47m": dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8),
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


def measure(size: str, length: int, batch: int, checkpointing: bool) -> dict:
    """One clipped backward in this process; its peak memory above the start, in MB."""
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpllm.lm import collate, forward_per_sample_loss
    from dpllm.privacy import PerSampleClipper

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size])).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(batch)]
    inputs = collate([{"input_ids": r, "labels": r} for r in rows], pad_id=0)
    clipper = PerSampleClipper(model, max_grad_norm=1.0, verify_first_backward=False, grad_sink=lambda name, s: None)
    process, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    start = process.memory_info().rss
    peak[0] = start
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    norms = clipper.backward(forward_per_sample_loss(model, inputs))
    seconds = time.perf_counter() - began
    stop.set()
    sampler.join()
    return {"peak_mb": round((peak[0] - start) / 2**20), "seconds": round(seconds, 2), "norms": norms.tolist(),
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="47m")
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--measure", nargs=2, metavar=("T", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.size, int(args.measure[0]), args.batch, args.measure[1] == "1")))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    print("| T | without (MB) | with (MB) | with / without | seconds without | seconds with |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        runs = {}
        for flag in ("0", "1"):
            cmd = [sys.executable, __file__, "--size", args.size, "--batch", str(args.batch), "--measure", str(length), flag]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[flag] = json.loads(done.stdout.strip().splitlines()[-1])
        if any(abs(a - b) > 1e-6 * abs(a) for a, b in zip(runs["0"]["norms"], runs["1"]["norms"])):
            raise SystemExit(f"T={length}: per-sample norms differ with checkpointing: {runs['0']['norms']} vs {runs['1']['norms']}")
        off, on = runs["0"], runs["1"]
        print(f"| {length} | {off['peak_mb']} | {on['peak_mb']} | {on['peak_mb'] / max(off['peak_mb'], 1):.2f} "
              f"| {off['seconds']} | {on['seconds']} |", flush=True)
    print(f"\n{args.size}: {off['parameters'] / 1e6:.1f}M parameters, batch {args.batch}; peaks above the memory held before the forward")


if __name__ == "__main__":
    main()
