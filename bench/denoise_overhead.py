"""Denoising time as a fraction of a private step, for real model layer shapes, full vs partial SVD.

    python bench/denoise_overhead.py [--models qwen2.5-0.5b,llama-3.2-1b] [--device cpu|cuda]
                                     [--logical-batch 1024] [--seq 128]

Per transformer layer, in one process:
  * step: the private step's time per layer, measured as (step of a 2-layer model) minus
    (step of a 1-layer model) at the real widths, per token, scaled to a logical batch of
    ``--logical-batch`` sequences of ``--seq`` tokens (denoising runs once per logical batch,
    the forward/backward once per token);
  * denoise: the layer's seven projection gradients (rank-8 signal + noise) denoised with
    one batched SVD per shape, "full" (torch.linalg.svd) and "partial" (block Lanczos).
The fraction printed is denoise / (step + denoise). No weights are downloaded: the models
are built from their published shapes with random weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpllm.denoise import rmt_denoise_batched  # noqa: E402
from dpllm.lm import per_sample_loss  # noqa: E402
from dpllm.privacy.accountant import PrivacyAccountant  # noqa: E402
from dpllm.privacy.noise import GaussianNoise  # noqa: E402
from dpllm.steps.private import PrivateStep  # noqa: E402

SHAPES = {  # hidden, intermediate, heads, kv heads (head_dim 64)
    "qwen2.5-0.5b": dict(hidden=896, intermediate=4864, heads=14, kv_heads=2, family="qwen2"),
    "llama-3.2-1b": dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, family="llama"),
}


def layer_matrices(spec: dict) -> list[tuple[int, int]]:
    h, i, kv = spec["hidden"], spec["intermediate"], spec["kv_heads"] * 64
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down (out, in)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step_time(spec: dict, layers: int, batch: int, seq: int, device: str, repeats: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_cfg, cls = (Qwen2Config, Qwen2ForCausalLM) if spec["family"] == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cls_cfg(
        vocab_size=4096,
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=seq,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = cls(cfg).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = PrivateStep(
        model,
        opt,
        max_grad_norm=1.0,
        noise=GaussianNoise(1.0, 1.0, seed=0),
        noise_multiplier=1.0,
        sample_rate=0.01,
        expected_batch_size=batch,
        accountant=PrivacyAccountant(1e-5),
    )
    ids = torch.randint(0, 4096, (batch, seq), device=device)
    mask = torch.ones_like(ids)

    def run():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        step.clip_and_accumulate(per_sample_loss(logits, ids))
        step.step()

    run()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def denoise_time(spec: dict, method: str, device: str, repeats: int) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    stacks = {}
    for m, n in layer_matrices(spec):
        crit = (m * n) ** 0.25
        u = torch.linalg.qr(torch.randn(m, 8, device=device, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, 8, device=device, generator=g)).Q
        signal = (u * (torch.linspace(1.5, 10, 8, device=device) * crit)) @ v.T
        stacks.setdefault((m, n), []).append(signal + torch.randn(m, n, device=device, generator=g))
    stacks = [torch.stack(v) for v in stacks.values()]
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for stack in stacks:
            rmt_denoise_batched(stack, 1.0, method=method)
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-0.5b,llama-3.2-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--logical-batch", type=int, default=1024, help="sequences per private step")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"device {args.device}; logical batch {args.logical_batch} x {args.seq} tokens; micro-batch {args.micro_batch}")
    print(f"{'model':<15}{'step/layer s':>14}{'full s':>9}{'partial s':>11}{'full %':>9}{'partial %':>11}")
    for name in args.models.split(","):
        spec = SHAPES[name]
        one = step_time(spec, 1, args.micro_batch, args.seq, args.device, args.repeats)
        two = step_time(spec, 2, args.micro_batch, args.seq, args.device, args.repeats)
        per_layer = max(two - one, 1e-9) * args.logical_batch / args.micro_batch
        full = denoise_time(spec, "full", args.device, args.repeats)
        partial = denoise_time(spec, "partial", args.device, args.repeats)
        print(
            f"{name:<15}{per_layer:>14.2f}{full:>9.2f}{partial:>11.2f}"
            f"{100 * full / (per_layer + full):>8.2f}%{100 * partial / (per_layer + partial):>10.2f}%"
        )


if __name__ == "__main__":
    main()
