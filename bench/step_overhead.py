"""Time and peak memory of a private step vs a non-private step vs Opacus ghost clipping.

    pip install -r requirements-bench.txt
    python bench/step_overhead.py [--steps 20] [--configs short,long] [--device cpu|cuda] [--memory-runs 3]

All variants run on identically initialised models with the same batch; step times are
medians with the variants stepped in turn (so machine noise hits all alike), peak memory is
measured in fresh processes, one variant each:
  non-private   forward, mean loss backward, AdamW step
  dpllm         forward, PerSampleClipper (ghost norms, one backward), noise, AdamW step
  opacus-ghost  Opacus 1.6 grad_sample_mode="ghost" (two backward passes), same optimizer

Opacus has no per-sample rule for Hugging Face's LlamaRMSNorm, so in the Opacus comparison
all three variants freeze the RMSNorm weights (they are < 0.1% of the parameters); the
dpllm vs non-private ratios are also reported with everything trainable.
A line under the first table splits the private step's extra time into the noise stage, the
ghost norms' T x T Gram matrices (profiled) and the rest, and gives the ratio the first two alone
would leave: a floor for exact ghost clipping on this machine.
Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the process's peak resident
memory (VmHWM) above what it held before the model was built. CPU readings vary by ~15 MB from
process to process, so each variant's peak is the median over ``--memory-runs`` fresh processes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "short": dict(layers=4, hidden=256, intermediate=688, vocab=2048, batch=16, seq=64),
    "long": dict(layers=4, hidden=256, intermediate=688, vocab=2048, batch=16, seq=512),
    "smoke": dict(layers=1, hidden=64, intermediate=128, vocab=256, batch=4, seq=16),  # the tests run this
}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def build_step(variant: str, cfg: dict, device: str, freeze_norms: bool):
    """A closure running one optimizer step of ``variant`` on a fresh, identically seeded model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dpllm.lm import per_sample_loss

    torch.manual_seed(0)
    model_cfg = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=max(cfg["hidden"] // 64, 1),
        num_key_value_heads=max(cfg["hidden"] // 64, 1),
        max_position_embeddings=max(cfg["seq"], 64),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(model_cfg).to(device)
    if freeze_norms:
        for name, p in model.named_parameters():
            if "norm" in name:
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    B, T = cfg["batch"], cfg["seq"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    noise_times: list[float] = []
    ids = torch.randint(0, cfg["vocab"], (B, T), device=device, generator=torch.Generator(device).manual_seed(1))
    mask = torch.ones_like(ids)

    if variant == "non-private":

        def step():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            per_sample_loss(logits, ids).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    elif variant == "dpllm":
        from dpllm.privacy.accountant import PrivacyAccountant
        from dpllm.privacy.noise import GaussianNoise
        from dpllm.steps.private import PrivateStep

        private = PrivateStep(
            model,
            optimizer,
            max_grad_norm=1.0,
            noise=GaussianNoise(1.0, 1.0, seed=0),
            noise_multiplier=1.0,
            sample_rate=0.01,
            expected_batch_size=B,
            accountant=PrivacyAccountant(1e-5),
        )

        def step():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            private.clip_and_accumulate(per_sample_loss(logits, ids))
            private.step()

        add_noise = private.add_noise

        def timed_noise():  # the noise stage's own time, for the breakdown
            start = time.perf_counter()
            add_noise()
            sync()
            noise_times.append(time.perf_counter() - start)

        private.add_noise = timed_noise

    elif variant == "opacus-ghost":
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids.cpu()), batch_size=B)
        model, optimizer, criterion, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=torch.nn.CrossEntropyLoss(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="ghost",
            poisson_sampling=False,
        )

        def step():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            labels = ids[:, 1:]
            loss = criterion(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), shape=logits.shape)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    else:
        raise ValueError(variant)

    def timed_step() -> float:
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    timed_step()  # warm-up (and dpllm's one-time check against autograd)
    noise_times.clear()
    timed_step.noise_times = noise_times
    timed_step.step = step
    return timed_step


def peak_memory_worker(variant: str, cfg: dict, steps: int, device: str, freeze_norms: bool) -> float:
    """Peak memory (MB) of ``steps`` steps after warm-up, in this (fresh) process."""
    import torch

    base_kb = _rss_kb("VmRSS")
    step = build_step(variant, cfg, device, freeze_norms)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        step()
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (_rss_kb("VmHWM") - base_kb) / 1024


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def interleaved_times(variants: list[str], cfg: dict, steps: int, device: str, freeze_norms: bool) -> tuple[dict, dict]:
    """Median step time of each variant, stepping them in turn so machine noise hits all alike;
    and the variants' steps, for the breakdown."""
    fns = {v: build_step(v, cfg, device, freeze_norms) for v in variants}
    times = {v: [] for v in variants}
    for _ in range(steps):
        for v, fn in fns.items():
            times[v].append(fn())
    return {v: median(ts) for v, ts in times.items()}, fns


def gram_seconds(step, steps: int, device: str, seq: int) -> float:
    """Time per step in batched matmuls with a (B, seq, seq) product, profiled: in a dpllm step
    these are the T x T Gram matrices of the ghost norms (the direct path's per-sample gradients,
    (B, m, n) products, replace the weight-gradient matmuls and are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
    field = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = e.input_shapes
        if e.key == "aten::bmm" and len(shapes) == 2 and shapes[0][1] == seq and shapes[1][2] == seq:
            total += getattr(e, field)
    return total / 1e6 / steps


def overhead_breakdown(times: dict, fns: dict, device: str, seq: int) -> str:
    """Where the private step's extra time goes: the noise, which DP-SGD cannot skip, and the
    Gram matrices, which exact ghost norms cannot skip; their sum bounds the ratio below."""
    base, extra = times["non-private"], times["dpllm"] - times["non-private"]
    noise = median(fns["dpllm"].noise_times)
    gram = gram_seconds(fns["dpllm"].step, 5, device, seq) - gram_seconds(fns["non-private"].step, 5, device, seq)
    return (
        f"dpllm's extra {extra * 1e3:.1f} ms per step: noise {noise * 1e3:.1f} ms, Gram matrices (profiled) "
        f"{gram * 1e3:.1f} ms, the rest {(extra - noise - gram) * 1e3:.1f} ms; the non-private step plus "
        f"the noise and the Gram matrices alone would be a ratio of {(base + noise + gram) / base:.2f}"
    )


def peak_memory(variant, name, device, freeze_norms, runs: int) -> float:
    """Median peak memory (MB) of ``variant`` over ``runs`` fresh worker processes."""
    cmd = [sys.executable, __file__, "--worker", variant, "--configs", name, "--steps", "3", "--device", device]
    if freeze_norms:
        cmd.append("--freeze-norms")
    peaks = sorted(float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1]) for _ in range(runs))
    return peaks[len(peaks) // 2]


def report(rows: list[tuple[str, str]], times: dict, mems: dict, base: str) -> None:
    print(f"{'variant':<30}{'step s':>9}{'peak MB':>10}{'time ratio':>12}{'mem ratio':>11}")
    for label, v in rows:
        print(f"{label:<30}{times[v]:>9.4f}{mems[v]:>10.0f}{times[v] / times[base]:>12.2f}{mems[v] / mems[base]:>11.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--configs", default="short,long")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-opacus", action="store_true")
    ap.add_argument("--memory-runs", type=int, default=3, help="fresh processes per variant for the peak memory")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--freeze-norms", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(peak_memory_worker(args.worker, CONFIGS[args.configs], args.steps, args.device, args.freeze_norms))
        return
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        print(f"\n== {name}: Llama {cfg['layers']} layers, hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, "
              f"vocab {cfg['vocab']}, B={cfg['batch']}, T={cfg['seq']}, {args.device}, median of {args.steps} steps "
              f"(time) and of {args.memory_runs} processes (memory)")
        variants = ["non-private", "dpllm"]
        times, fns = interleaved_times(variants, cfg, args.steps, args.device, False)
        breakdown = overhead_breakdown(times, fns, args.device, cfg["seq"])
        del fns
        mems = {v: peak_memory(v, name, args.device, False, args.memory_runs) for v in variants}
        report([("non-private", "non-private"), ("dpllm private", "dpllm")], times, mems, "non-private")
        print(breakdown)
        if args.skip_opacus:
            continue
        variants.append("opacus-ghost")
        times, _ = interleaved_times(variants, cfg, args.steps, args.device, True)
        mems = {v: peak_memory(v, name, args.device, True, args.memory_runs) for v in variants}
        print("-- RMSNorm weights frozen in all three (Opacus has no rule for LlamaRMSNorm)")
        report([("non-private", "non-private"), ("dpllm private", "dpllm"), ("opacus ghost clipping", "opacus-ghost")],
               times, mems, "non-private")
        print(f"opacus ghost / dpllm step time: {times['opacus-ghost'] / times['dpllm']:.2f}x")


if __name__ == "__main__":
    main()
