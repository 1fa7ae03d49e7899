"""The README's launch commands, as subprocess argument lists for tests (CPU, gloo, 2 processes)."""

import os
import subprocess
import sys
from pathlib import Path

import psutil

from dpllm.distributed import local

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = "recipes/e2e/tiny_cpu.yaml"
# A few seconds per step on the embedded model: small data, short sequences, no generation.
TINY = [
    "data.max_train_examples=200",
    "data.max_eval_examples=20",
    "data.max_length=64",
    "batch_size=16",
    "micro_batch_size=8",
    "eval_every=0",
    "progress=false",
    "generation.at_end=false",
    "generation.every=0",
    "seed=3",
    "privacy.noise_seed=3",  # runs compared with each other share their sample and noise
]


def free_port() -> str:
    return str(local.free_port())


def command(kind: str, args: list[str], script: str = "launch/e2e.py", processes: int = 2) -> list[str]:
    """``kind``: single (python), deepspeed (ZeRO-2) or zero3 (ZeRO-3) under the DeepSpeed launcher,
    fsdp or ddp under torchrun; ``processes`` each."""
    if kind == "single":
        return [sys.executable, script, *args]
    port = free_port()
    if kind in ("deepspeed", "zero3"):
        ds = "ds_configs/zero3.json" if kind == "zero3" else "ds_configs/zero2.json"
        return [str(BIN / "deepspeed"), "--num_gpus", str(processes), "--master_port", port, script, "--config", ds, *args]
    return [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port", port, script, "--engine", kind, *args]


def env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start a launcher (or script) from the repository root, its output captured as text."""
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen(cmd, cwd=REPO, env=kwargs.pop("env", env()), text=True, start_new_session=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for ``proc``; past ``timeout`` (or if the test is interrupted) kill it with every process
    it started. Killing the launcher alone would leave DeepSpeed's per-node launch process and the
    workers running into the next test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(proc.args)}\n{(out or '')[-3000:]}{(err or '')[-3000:]}")
    except BaseException:
        _kill_tree(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        root = psutil.Process(proc.pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return finish(start(cmd, **kwargs), timeout)
