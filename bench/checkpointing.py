"""Peak memory of one clipped backward per clipping mode, with and without activation
checkpointing, per sequence length.

    python bench/checkpointing.py                      # 12 layers, hidden 512 (47M parameters), T = 256, 1024
    python bench/checkpointing.py --size 110m --lengths 256 1024 4096 --batch 2

Each measurement runs in a fresh process: a Llama with random weights (train mode), one batch of
``--batch`` random sequences of T tokens, forward and the clipper's backward (the clipped sums
dropped as formed) in each of ``privacy.clipping``'s modes (book_keeping, two_pass), with Hugging
Face's non-reentrant checkpointing and without. Printed: the peak resident memory above what the
process held before the forward (sampled every 5 ms; glibc's mmap threshold fixed at 128 KiB so
that freed tensors leave the resident set), and its ratio to book-keeping without checkpointing,
measured in the same run. The script exits non-zero if the per-sample norms differ between them.
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
    "110m": dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "47m": dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8),
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


def measure(size: str, length: int, batch: int, checkpointing: bool, mode: str) -> dict:
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
    clipper = PerSampleClipper(model, max_grad_norm=1.0, mode=mode, verify_first_backward=False, grad_sink=lambda name, s: None)
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
    parser.add_argument("--measure", nargs=3, metavar=("T", "CHECKPOINTING", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        length, flag, mode = args.measure
        print(json.dumps(measure(args.size, int(length), args.batch, flag == "1", mode)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    print("| T | clipping | checkpointing | peak (MB) | vs book_keeping without | seconds |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        base = None
        for mode, flag in (("book_keeping", "0"), ("book_keeping", "1"), ("two_pass", "0"), ("two_pass", "1")):
            cmd = [sys.executable, __file__, "--size", args.size, "--batch", str(args.batch), "--measure", str(length), flag, mode]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            base = base or run
            if any(abs(a - b) > 1e-6 * abs(a) for a, b in zip(base["norms"], run["norms"])):
                raise SystemExit(f"T={length}: per-sample norms of {mode}, checkpointing {flag} differ: {run['norms']} vs {base['norms']}")
            print(f"| {length} | {mode} | {'on' if flag == '1' else 'off'} | {run['peak_mb']} "
                  f"| {run['peak_mb'] / max(base['peak_mb'], 1):.2f} | {run['seconds']} |", flush=True)
    print(f"\n{args.size}: {base['parameters'] / 1e6:.1f}M parameters, batch {args.batch}; peaks above the memory held before the forward")


if __name__ == "__main__":
    main()
