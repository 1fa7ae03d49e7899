"""What FSDP2 itself needs per rank without DP, on the model bench/memory.py measures.

    python bench/fsdp_without_dp.py                     # smol_llama-220M-GQA, SGD, 1 and 2 processes
    python bench/fsdp_without_dp.py --optim adamw --worlds 1 2 4

The reference for bench/memory.py's FSDP2 ratios: plain (non-private) training with the same
units (each decoder layer, untied input and output embeddings, the root), the same shapes
(micro-batches of 1 sequence of 64 random tokens, 4 per step, 2 steps) and the same measurement
(resident memory sampled every 3 ms over the training steps, after sharding; glibc's mmap
threshold at 128 KiB; minus the same run with the embedded 260K-parameter model). Every rank
loads the whole model before sharding here: the setup is not what is compared.
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
sys.path.insert(0, str(REPO / "bench"))

from memory import MODELS, TINY_MODEL, _free_port, save_model  # noqa: E402


def worker(model_path: str, optim: str) -> None:
    import psutil
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    for m in model.modules():
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m)
    if not model.config.tie_word_embeddings:
        fully_shard(model.get_input_embeddings())
        fully_shard(model.get_output_embeddings())
    fully_shard(model)
    opt = (torch.optim.AdamW if optim == "adamw" else torch.optim.SGD)(model.parameters(), lr=1e-4)
    peak = [0.0]

    def sample() -> None:
        me = psutil.Process()
        while True:
            peak[0] = max(peak[0], me.memory_info().rss / 2**20)
            time.sleep(0.003)

    threading.Thread(target=sample, daemon=True).start()
    for _ in range(2):
        for _ in range(4):
            ids = torch.randint(0, model.config.vocab_size, (1, 64))
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    time.sleep(0.05)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak[0])
    if dist.get_rank() == 0:
        print(json.dumps({"peak_mb": max(peaks)}))
    dist.destroy_process_group()


def run(model: Path, world: int, optim: str) -> float:
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(_free_port()),
           __file__, "--worker", str(model), "--optim", optim]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:  # the workers' own error, not only the launcher's exit status
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smol-llama-220m")
    parser.add_argument("--optim", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench_memory")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.optim)
        return
    model = save_model(args.model, args.out / "models" / args.model)
    one = None
    print(f"FSDP2 without DP, {args.model}, {args.optim}: model memory per rank (largest rank)")
    for world in args.worlds:
        mb = run(model, world, args.optim) - run(REPO / TINY_MODEL, world, args.optim)
        one = one or mb
        print(f"  {world} process(es): {mb:7.0f} MB  ratio to one {mb / one:.3f}")


if __name__ == "__main__":
    main()
