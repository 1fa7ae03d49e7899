"""Atomic checkpoints, kill-and-resume, and the privacy-budget guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dpllm.config import load_config
from dpllm.privacy.accounting import compute_epsilon, epsilon_of_history
from dpllm.training.trainer import train
from tests.conftest import save_tiny_bert, save_untied_qwen2
from tests.launchers import REPO, TINY, command, env, run

RECIPE = REPO / "recipes/e2e/tiny_cpu.yaml"
COMMON = [*TINY, "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"]
Q, DELTA = 16 / 200, 1 / 400


def _command(kind: str, args: list[str]) -> list[str]:
    return command(kind, ["--recipe", str(RECIPE), *args])


def _run(kind: str, args: list[str]) -> dict:
    done = run(_command(kind, COMMON + args))
    assert done.returncode == 0, done.stderr[-3000:]
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    return {"params": load_file(out / "final/model.safetensors"), "summary": json.loads((out / "summary.json").read_text())}


def _run_and_kill_after_first_checkpoint(kind: str, out: Path, extra: tuple[str, ...] = ()) -> None:
    """Start a long run that checkpoints every 3 steps; SIGKILL it once step 3 is on disk."""
    args = COMMON + [*extra, "max_steps=1000", "checkpoint_every=3", f"output_dir={out}"]
    proc = subprocess.Popen(
        _command(kind, args), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    latest = out / "checkpoints/latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(workers, timeout=30)  # launchers start workers in sessions of their own
    assert not alive, alive
    assert latest.read_text() == "step_3"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single", "deepspeed", "zero3", "fsdp"])
def test_kill_and_resume_gives_the_straight_run(tmp_path, kind):
    # FSDP2 on an untied model (its vocabulary matrices row-sharded, 515 rows: unequal pieces)
    model = [f"model.name_or_path={save_untied_qwen2(tmp_path / 'untied', vocab=515)}"] if kind == "fsdp" else []
    straight = _run("single", [*model, "max_steps=6", f"output_dir={tmp_path / 'straight'}"])
    _run_and_kill_after_first_checkpoint(kind, tmp_path / "killed", tuple(model))
    # Other seeds on the resumed command: a restart would initialise, sample and noise differently;
    # a resume restores all three from the checkpoint.
    other = ["seed=11", "privacy.noise_seed=11"]
    resumed = _run(kind, [*model, "max_steps=6", *other, f"resume={tmp_path / 'killed'}", f"output_dir={tmp_path / 'killed'}"])
    assert resumed["summary"]["epsilon"] == straight["summary"]["epsilon"] == pytest.approx(
        compute_epsilon(1.0, Q, 6, DELTA), rel=1e-9
    )
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=1e-5 if kind != "single" else 0)
    for log in ("metrics.jsonl", "diagnostics/metrics.jsonl"):  # each log continues, no gap or repeat
        rows = [json.loads(line) for line in (tmp_path / "killed" / log).read_text().splitlines()]
        assert [r["step"] for r in rows if "epsilon" in r or "loss" in r] == [1, 2, 3, 4, 5, 6]
    saved = load_file(tmp_path / "killed/checkpoints/step_3/model/model.safetensors")  # HF form, every engine
    assert set(saved) == set(straight["params"])


@pytest.mark.slow
def test_zeroth_order_under_zero3_resumes_exactly(tmp_path):
    """dp_zo under ZeRO-3 keeps no optimizer: its checkpoint holds each rank's weight partitions
    (with DP-ZOPO's selection and DP-ZOSO's stage starting point), and a run cut at step 2 and
    resumed ends where the straight run ends."""
    zo = [
        "algorithm=dp_zo", "zo.directions=2", "zo.lr=0.01", "batch_size=3", "micro_batch_size=1", "zo.select_fraction=0.3",
        "zo.regularization=0.5", "zo.stages=2", "zo.stage_steps=1",
    ]
    straight = _run("zero3", [*zo, "max_steps=4", f"output_dir={tmp_path / 'straight'}"])
    _run("zero3", [*zo, "max_steps=2", "checkpoint_every=2", f"output_dir={tmp_path / 'cut'}"])
    assert sorted(p.name for p in (tmp_path / "cut/checkpoints/step_2").glob("partition_rank*.pt")) == [
        "partition_rank0.pt", "partition_rank1.pt"
    ]
    resumed = _run("zero3", [*zo, "max_steps=4", "seed=11", f"resume={tmp_path / 'cut'}", f"output_dir={tmp_path / 'cut'}"])
    start = load_file(REPO / "assets/models/stories260K/model.safetensors")
    assert max(float((straight["params"][n] - start[n]).abs().max()) for n in start) > 1e-4  # it did train
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=0, msg=name)


LMO = ("privacy.mechanism=lmo", "lmo.a1=0.5", "lmo.k=2", "lmo.a4=0.5", "lmo.lo=0.5", "lmo.hi=1.5")


@pytest.mark.slow
def test_lmo_kill_and_resume_gives_the_straight_run(tmp_path):
    """LMO-DP's random scales come from the keyed streams and its accountant's history is in the
    checkpoint: killed after step 3 and resumed on FSDP2, the run ends where the straight run
    ends, and its epsilon is lmo.py's bound for the 6 steps, not for 3 or 9."""
    from dpllm.privacy import lmo

    straight = _run("single", [*LMO, "max_steps=6", f"output_dir={tmp_path / 'straight'}"])
    _run_and_kill_after_first_checkpoint("fsdp", tmp_path / "killed", LMO)
    other = ["seed=11", "privacy.noise_seed=11"]
    resumed = _run("fsdp", [*LMO, "max_steps=6", *other, f"resume={tmp_path / 'killed'}", f"output_dir={tmp_path / 'killed'}"])
    summary = resumed["summary"]
    assert (summary["mechanism"], summary["steps"], summary["noise_multiplier"]) == ("lmo", 6, 1.0)
    law = lmo.LMONoise(a1=0.5, k=2, theta=1.0, a3=0.0, lam=1.0, a4=0.5, lo=0.5, hi=1.5)  # noise multiplier 1: the law itself
    assert summary["epsilon"] == straight["summary"]["epsilon"] == pytest.approx(lmo.epsilon(law, 1.0, Q, 6, DELTA), rel=1e-12)
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=1e-5, msg=name)


def test_resume_restores_the_dropout_generator(tmp_path):
    """A BERT classifier with dropout resumed from step 2 ends where the straight run ends."""
    sst2 = REPO / "assets/data/glue/SST-2"
    common = [
        f"model.name_or_path={save_tiny_bert(tmp_path / 'bert', sst2, dropout=0.1)}", "model.freeze=[]",
        f"data.train_file={sst2}", f"data.eval_file={sst2}", "data.max_train_examples=200", "data.max_eval_examples=20",
        "batch_size=16", "micro_batch_size=8", "eval_every=0", "progress=false", "max_steps=4", "checkpoint_every=2",
    ]
    recipe = REPO / "recipes/glue/minilm_sst2_cpu.yaml"
    train(load_config(recipe, [*common, f"output_dir={tmp_path / 'straight'}"]))
    train(load_config(recipe, [*common, f"resume={tmp_path / 'straight/checkpoints/step_2'}", f"output_dir={tmp_path / 'resumed'}"]))
    straight, resumed = (load_file(tmp_path / f"{run}/final/model.safetensors") for run in ("straight", "resumed"))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_budget_guard_stops_at_the_last_step_within_the_target(tmp_path):
    first = load_config(RECIPE, COMMON + ["privacy.noise_multiplier=0.6", "max_steps=3", "checkpoint_every=3", f"output_dir={tmp_path}"])
    train(first)
    # Resumed at a larger sigma under a target that the plan (6 steps at 1.0) meets but the real
    # history (3 steps at 0.6, then 1.0) does not: only 2 more steps fit.
    spent_5 = epsilon_of_history([(0.6, Q, 3), (1.0, Q, 2)], DELTA)
    spent_6 = epsilon_of_history([(0.6, Q, 3), (1.0, Q, 3)], DELTA)
    target = (spent_5 + spent_6) / 2
    assert compute_epsilon(1.0, Q, 6, DELTA) < target
    resumed = load_config(RECIPE, COMMON + [f"privacy.target_epsilon={target}", "max_steps=6", f"resume={tmp_path}", f"output_dir={tmp_path}"])
    summary = train(resumed)
    assert summary["steps"] == 5 and summary["planned_steps"] == 6
    assert summary["epsilon"] == pytest.approx(spent_5, rel=1e-9) and summary["epsilon"] <= target
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 5, "stopped": "privacy budget", "epsilon": summary["epsilon"]} in rows
    assert (tmp_path / "checkpoints/step_5/state.json").is_file() and (tmp_path / "checkpoints/latest").read_text() == "step_5"


def test_plan_that_cannot_meet_the_target_is_refused_before_training(tmp_path):
    eps_3 = compute_epsilon(1.0, Q, 3, DELTA)
    eps_4 = compute_epsilon(1.0, Q, 4, DELTA)
    config = load_config(RECIPE, COMMON + [f"privacy.target_epsilon={(eps_3 + eps_4) / 2}", "max_steps=6", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"spends epsilon .* at most 3 steps fit"):
        train(config)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_refuses_another_engine_or_world_size(tmp_path):
    train(load_config(RECIPE, COMMON + ["max_steps=3", "checkpoint_every=3", f"output_dir={tmp_path}"]))
    state = json.loads((tmp_path / "checkpoints/step_3/state.json").read_text())
    state["world_size"] = 2
    (tmp_path / "checkpoints/step_3/state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="on 2 processes; resume it with the same"):
        train(load_config(RECIPE, COMMON + ["max_steps=6", f"resume={tmp_path}", f"output_dir={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        train(load_config(RECIPE, COMMON + ["max_steps=6", f"resume={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'x'}"]))


def test_secure_mode_checkpoints_hold_no_seed(tmp_path):
    secure = COMMON + ["privacy.noise_seed=null", "privacy.secure_mode=true"]
    train(load_config(RECIPE, secure + ["max_steps=2", "checkpoint_every=2", f"output_dir={tmp_path}"]))
    state = json.loads((tmp_path / "checkpoints/step_2/state.json").read_text())
    assert state["sampler"] is None and state["noise"] is None and state["accountant"]["history"] == [[1.0, Q, 2]]
    resumed = train(load_config(RECIPE, secure + ["max_steps=3", f"resume={tmp_path}", f"output_dir={tmp_path}"]))
    assert resumed["epsilon"] == pytest.approx(compute_epsilon(1.0, Q, 3, DELTA), rel=1e-9)


def test_a_default_run_with_a_secret_seed_resumes_exactly(tmp_path):
    """The checkpoint keeps the secret seed (checkpoints are secret): the resumed run is the straight run."""
    secret = COMMON + ["privacy.noise_seed=null", "max_steps=4"]
    train(load_config(RECIPE, secret + ["checkpoint_every=2", f"output_dir={tmp_path / 'straight'}"]))
    train(load_config(RECIPE, secret + [f"resume={tmp_path / 'straight/checkpoints/step_2'}", f"output_dir={tmp_path / 'resumed'}"]))
    train(load_config(RECIPE, secret + [f"output_dir={tmp_path / 'restarted'}"]))
    straight, resumed, restarted = (load_file(tmp_path / f"{r}/final/model.safetensors") for r in ("straight", "resumed", "restarted"))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(restarted[n], v) for n, v in straight.items())  # a fresh run draws another secret


@pytest.mark.parametrize(
    "first, then, named",
    [
        (["privacy.enabled=false"], [], "private: checkpoint False, this run True"),
        ([], ["data.max_train_examples=100"], "num_train_examples: checkpoint 200, this run 100"),
        ([], ["privacy.delta=1e-4"], "delta: checkpoint 0.0025, this run 0.0001"),
        ([], ["data.max_length=128"], "train_data_sha256"),
    ],
    ids=["non_private_checkpoint", "dataset_size", "delta", "other_data"],
)
def test_resume_refuses_a_checkpoint_of_another_privacy_history(tmp_path, first, then, named):
    train(load_config(RECIPE, COMMON + first + ["max_steps=2", "checkpoint_every=2", f"output_dir={tmp_path / 'first'}"]))
    resume = COMMON + then + ["max_steps=4", f"resume={tmp_path / 'first'}", f"output_dir={tmp_path / 'second'}"]
    with pytest.raises(ValueError, match=rf"another privacy history \(.*{named}.*accept_resume_mismatch"):
        train(load_config(RECIPE, resume))
    assert not (tmp_path / "second/final").exists()
    summary = train(load_config(RECIPE, resume + ["privacy.accept_resume_mismatch=true"]))
    report = json.loads((tmp_path / "second/final/privacy.json").read_text())
    assert any(named in m for m in summary["resume_mismatch"]) and report["resume_mismatch"] == summary["resume_mismatch"]
    assert "history differs" in (tmp_path / "second/final/PRIVACY.md").read_text()
    if first:  # the non-private steps are not in the history: epsilon covers the 2 private steps only
        assert summary["epsilon"] == pytest.approx(compute_epsilon(1.0, Q, 2, DELTA), rel=1e-9)


KILL_DURING_SAVE = """
import os, runpy, signal, sys
import torch
save = torch.save
def save_then_die(obj, f, *args, **kwargs):  # the first file of step_6 is written, then the process dies
    save(obj, f, *args, **kwargs)
    if "step_6.partial" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.argv = ["launch/e2e.py", *sys.argv[1:]]
runpy.run_path("launch/e2e.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_only_complete_checkpoints(tmp_path):
    out = tmp_path / "killed"
    args = ["--recipe", str(RECIPE), *COMMON, "max_steps=9", "checkpoint_every=3", f"output_dir={out}"]
    done = run([sys.executable, "-c", KILL_DURING_SAVE, *args])
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert (out / "checkpoints/step_6.partial").is_dir() and not (out / "checkpoints/step_6").exists()
    assert (out / "checkpoints/latest").read_text() == "step_3"
    straight = _run("single", ["max_steps=6", f"output_dir={tmp_path / 'straight'}"])
    resumed = _run("single", ["max_steps=6", "seed=11", "privacy.noise_seed=11", f"resume={out}", f"output_dir={out}"])  # step_3
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=0)


def test_a_checkpoint_is_declared_complete_only_after_every_rank_has_written(tmp_path):
    """Two ranks as threads: rank 1 writes its optimizer partition late. The folder must not be
    renamed to ``step_N`` (and named in ``latest``) before that file is in it, or a kill at that
    moment leaves a "complete" checkpoint that lacks a rank's partition."""
    import threading
    from types import SimpleNamespace

    from dpllm.training import checkpoint

    barrier = threading.Barrier(2, timeout=20)

    class SlowOptimizer:
        def __init__(self, rank):
            self.rank = rank

        def state_dict(self):
            if self.rank == 1:
                time.sleep(0.5)
            return {"rank": self.rank}

    saver = SimpleNamespace(save_pretrained=lambda folder: Path(folder).mkdir(parents=True, exist_ok=True))
    context = checkpoint.PrivacyContext(True, 10, 1e-5, "pld", "0" * 64)
    errors = []

    def rank(r):
        env = SimpleNamespace(rank=r, world_size=2, is_main=r == 0, distributed=True, barrier=barrier.wait)
        try:
            checkpoint.save(
                tmp_path, 3, env=env, engine="deepspeed", model=saver, tokenizer=saver, optimizer=SlowOptimizer(r),
                accountant=SimpleNamespace(state_dict=lambda: {}), sampler=SimpleNamespace(secure=True),
                noise=None, rows=[], privacy=context,
            )
        except Exception as error:  # noqa: BLE001 - the assertion below names it
            errors.append(repr(error))
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = checkpoint.resolve(tmp_path)
    assert final.name == "step_3"
    assert torch.load(final / "optim_rank1.pt") == {"rank": 1}
