"""Private step time on 1 vs 2 processes, with the share of communication and of denoising.

    python bench/distributed_step.py [--engines ddp,fsdp,deepspeed] [--steps 10] [--denoise]

For each engine the script launches itself on 1 and on 2 processes (torchrun, or the DeepSpeed
launcher; gloo on CPU, NCCL on GPUs) with the same global batch, and prints per engine the median
step time (forward, clipped backward and the step's stages), the fractions of it spent in the
step's communication (reduce to owners + hand-over, waits for slower ranks included) and in
denoising, and the 2-process speed-up. On a CPU the processes share the machine's cores
(OMP_NUM_THREADS = cores / processes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = {"layers": 4, "hidden": 256, "intermediate": 688, "vocab": 2048, "batch": 32, "seq": 64}


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from dpllm.distributed import init_distributed
    from dpllm.steps import ShardedPrivateStep
    from dpllm.lm import forward_per_sample_loss
    from dpllm.privacy.accountant import PrivacyAccountant
    from dpllm.privacy.noise import GaussianNoise
    from dpllm.privacy.sampling import rank_share

    engine = {"ddp": "ddp", "fsdp": "fsdp", "deepspeed": "deepspeed"}[args.engine]
    env = init_distributed(engine)
    torch.manual_seed(0)
    m = MODEL
    cfg = LlamaConfig(
        vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"], num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(env.device())
    ids = torch.randint(0, m["vocab"], (m["batch"], m["seq"]), generator=torch.Generator().manual_seed(1))
    mine = rank_share(list(range(m["batch"])), env.rank, env.world_size)
    batch = {"input_ids": ids[mine].to(env.device()), "attention_mask": torch.ones_like(ids[mine]).to(env.device())}
    batch["labels"] = batch["input_ids"]
    optimizer = None if engine == "fsdp" else torch.optim.AdamW(model.parameters(), lr=1e-4)
    if engine == "deepspeed":
        import deepspeed

        ds = json.loads((REPO / "ds_configs/zero2.json").read_text())
        ds["train_micro_batch_size_per_gpu"] = len(mine)
        _, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    handover = {"ddp": "replicated", "fsdp": "fsdp", "deepspeed": "deepspeed"}[engine]
    step = ShardedPrivateStep(
        model, optimizer, env=env, handover=handover, max_grad_norm=1.0,
        noise=GaussianNoise(1.0, 1.0, seed=0), noise_multiplier=1.0, sample_rate=0.01,
        expected_batch_size=float(m["batch"]), accountant=PrivacyAccountant(1e-5),
        denoiser_options={"method": "full"} if args.denoise else None,
    )
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step.use_sharded(model, optimizer)
    times, comm, den = [], [], []
    for i in range(args.steps + 2):
        env.barrier()
        t = time.perf_counter()
        step.clip_and_accumulate(forward_per_sample_loss(model, batch))
        stats = step.step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t)
            comm.append(stats["comm_s"])
            den.append(stats["denoise_s"])
    if env.is_main:
        Path(args.out).write_text(json.dumps({
            "step_s": statistics.median(times), "comm_s": statistics.median(comm), "denoise_s": statistics.median(den),
        }))


def launch(engine: str, procs: int, steps: int, denoise: bool) -> dict:
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [str(Path(__file__)), "--worker", "--engine", engine, "--steps", str(steps), "--out", str(out)]
        args += ["--denoise"] if denoise else []
        if engine == "deepspeed":
            cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(procs), *args]
        else:
            cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(procs), *args]
        threads = str(max((os.cpu_count() or 2) // procs, 1))
        env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS=threads)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="ddp,fsdp,deepspeed")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--denoise", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"model {MODEL}, denoising {'on' if args.denoise else 'off'}, {args.steps} steps (median)\n")
    print("| engine | processes | step s | communication share | denoising share | speed-up vs 1 |")
    print("|---|---|---|---|---|---|")
    for engine in args.engines.split(","):
        one = launch(engine, 1, args.steps, args.denoise)
        for procs, r in ((1, one), (2, launch(engine, 2, args.steps, args.denoise))):
            print(
                f"| {engine} | {procs} | {r['step_s']:.3f} | {r['comm_s'] / r['step_s']:.1%} | "
                f"{r['denoise_s'] / r['step_s']:.1%} | {one['step_s'] / r['step_s']:.2f} |"
            )


if __name__ == "__main__":
    main()
