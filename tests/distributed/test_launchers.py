"""The README's multi-process launch commands, 1 process vs 2, on CPU with gloo."""

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dpllm.training.metrics import read_logs
from tests.conftest import save_tiny_bert, save_untied_qwen2
from tests.launchers import BIN, RECIPE, REPO, TINY, command, env, finish, free_port, run, start


def _launch(kind: str, out: Path, extra: list[str], recipe=("--recipe", RECIPE, *TINY), script="launch/e2e.py") -> dict:
    args = [*recipe, "max_steps=3", f"output_dir={out}", *extra]
    done = run(command(kind, args, script))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_logs(out)
    return {"params": load_file(out / "final/model.safetensors"), "rows": rows, "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("denoise", [False, True], ids=["plain", "denoised"])
def test_two_processes_match_one(tmp_path, denoise):
    extra = ["denoise.enabled=true"] if denoise else []
    kinds = ("deepspeed", "zero3", "fsdp", "ddp")
    shared_memory = set(Path("/dev/shm").glob("deepspeed*"))
    runs = {kind: _launch(kind, tmp_path / kind, extra) for kind in ("single", "zero3", "fsdp", "ddp")}
    # DeepSpeed with no --recipe (as in the README): the launcher defaults to the same tiny recipe
    runs["deepspeed"] = _launch("deepspeed", tmp_path / "deepspeed", extra, recipe=TINY)
    # DeepSpeed's CPU shared-memory all-reduce (inference only) is neither compiled nor left behind
    assert set(Path("/dev/shm").glob("deepspeed*")) <= shared_memory
    single = runs["single"]
    for kind in kinds:
        run = runs[kind]
        assert run["summary"]["world_size"] == 2 and single["summary"]["world_size"] == 1
        assert run["summary"]["epsilon"] == single["summary"]["epsilon"]
        for name, value in single["params"].items():
            torch.testing.assert_close(run["params"][name], value, rtol=0, atol=1e-5, msg=f"{kind}: {name}")
        steps = [r for r in run["rows"] if "loss" in r]
        assert [r["batch_size"] for r in steps] == [r["batch_size"] for r in single["rows"] if "loss" in r]
    moved = max(float((single["params"][n] - load_file(REPO / "assets/models/stories260K/model.safetensors")[n]).abs().max()) for n in single["params"])
    assert moved > 1e-3  # the runs did train
    if denoise:
        expected = [r["denoised_fraction"] for r in single["rows"] if "denoised_fraction" in r]
        assert max(expected) > 0  # some matrix was denoised, so the sharded path did real work
        for kind in kinds:
            assert [r["denoised_fraction"] for r in runs[kind]["rows"] if "denoised_fraction" in r] == expected


@pytest.mark.slow
def test_untied_qwen2_on_two_processes_matches_one(tmp_path):
    """Untied input and output embeddings are row-sharded under FSDP2 (gathered in blocks), and
    the partitioning engines' rank 0 loads into memory of its own: the trained model is still one
    process's."""
    folder = save_untied_qwen2(tmp_path / "qwen2")
    runs = {kind: _launch(kind, tmp_path / kind, [f"model.name_or_path={folder}"]) for kind in ("single", "fsdp", "zero3")}
    single = runs["single"]["params"]
    initial = load_file(folder / "model.safetensors")
    assert (single["lm_head.weight"] - initial["lm_head.weight"]).abs().max() > 1e-4  # the untied head trained
    for kind in ("fsdp", "zero3"):
        assert set(runs[kind]["params"]) == set(single)
        for name, value in single.items():
            torch.testing.assert_close(runs[kind]["params"][name], value, rtol=0, atol=1e-5, msg=f"{kind}: {name}")


@pytest.mark.slow
def test_fsdp_trains_an_encoder_classifier_like_one_process(tmp_path):
    """launch/glue.py under torchrun + FSDP2: same parameters as one process, classification head included."""
    sst2 = REPO / "assets/data/glue/SST-2"
    recipe = [  # no --recipe: launch/glue.py defaults to recipes/glue/minilm_sst2_cpu.yaml
        f"model.name_or_path={save_tiny_bert(tmp_path / 'bert', sst2)}",
        "model.freeze=[]", f"data.train_file={sst2}", f"data.eval_file={sst2}", "data.max_train_examples=200",
        "data.max_eval_examples=40", "batch_size=32", "micro_batch_size=8", "eval_every=0", "progress=false", "seed=3",
        "privacy.noise_seed=3",
    ]
    runs = {kind: _launch(kind, tmp_path / kind, ["denoise.enabled=true"], recipe, "launch/glue.py") for kind in ("single", "fsdp")}
    single, fsdp = runs["single"], runs["fsdp"]
    assert fsdp["summary"]["world_size"] == 2 and fsdp["summary"]["epsilon"] == single["summary"]["epsilon"]
    assert fsdp["summary"]["eval_accuracy_after"] == single["summary"]["eval_accuracy_after"]
    assert set(fsdp["params"]) == set(single["params"]) and "classifier.weight" in single["params"]
    initial = load_file(tmp_path / "bert/model.safetensors")
    assert (single["params"]["classifier.weight"] - initial["classifier.weight"]).abs().max() > 1e-4  # the head trained
    for name, value in single["params"].items():
        torch.testing.assert_close(fsdp["params"][name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_unequal_and_empty_rank_shares_match_one_process(tmp_path):
    """Poisson batches split unevenly: ranks have different numbers of micro-batches (one rank none
    at all) and must still step together, on every engine, instead of hanging in a per-micro-batch
    reduce (or a parameter gather of FSDP2 or ZeRO-3); FSDP2 and ZeRO-3 with two_pass too, whose sums
    are handed on in backward-completion order (a rank's padding micro-batch must keep that order)."""
    extra = ["batch_size=3", "micro_batch_size=1", "max_steps=6", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"]
    single = _launch("single", tmp_path / "single", extra)
    for kind, mode in (("fsdp", "auto"), ("fsdp", "two_pass"), ("zero3", "auto"), ("zero3", "two_pass"), ("deepspeed", "auto"),
                       ("ddp", "auto")):
        run = _launch(kind, tmp_path / f"{kind}_{mode}", [*extra, f"privacy.clipping={mode}"])
        sizes = [r["batch_size"] for r in run["rows"] if "batch_size" in r]
        assert any(n % 2 for n in sizes) and any(n <= 1 for n in sizes), sizes  # unequal shares, and an empty one
        for name, value in single["params"].items():
            torch.testing.assert_close(run["params"][name], value, rtol=0, atol=1e-5, msg=f"{kind}: {name}")


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_model_on_every_engine(tmp_path):
    """model.gradient_checkpointing=true (decoder layers recomputed in backward, parameters
    gathered again by FSDP2 and ZeRO-3 for it) trains, on one process and on two under every
    engine, the model that one process trains without it; privacy.clipping=auto runs two_pass on
    every engine (FSDP2 gathers each unit again for the second backward; ZeRO-3 fetches its
    partitions again once its backward counters are replayed), and book_keeping under ZeRO-3 too."""
    plain = _launch("single", tmp_path / "plain", [])
    assert plain["summary"]["clipping"] == "book_keeping"
    for kind, mode in (("single", "auto"), ("fsdp", "auto"), ("zero3", "auto"), ("zero3", "book_keeping"), ("deepspeed", "auto"),
                       ("ddp", "auto")):
        run = _launch(kind, tmp_path / f"{kind}_{mode}", ["model.gradient_checkpointing=true", f"privacy.clipping={mode}"])
        assert run["summary"]["clipping"] == ("two_pass" if mode == "auto" else mode), kind
        for name, value in plain["params"].items():
            torch.testing.assert_close(run["params"][name], value, rtol=0, atol=1e-5, msg=f"{kind}: {name}")


@pytest.mark.slow
def test_bf16_mixed_on_two_processes_matches_one_process(tmp_path):
    """precision=bf16-mixed under torchrun: replicated, the same autocast forwards per example on
    every rank as in one process; FSDP2 gathers its units in bf16 (MixedPrecisionPolicy), so its
    forwards are FSDP2's on one process. fp32 sums and weights throughout."""
    runs = {kind: _launch(kind, tmp_path / kind, ["precision=bf16-mixed"]) for kind in ("single", "ddp", "fsdp")}
    args = ["--recipe", RECIPE, *TINY, "max_steps=3", f"output_dir={tmp_path / 'fsdp1'}", "precision=bf16-mixed"]
    done = run(command("fsdp", args, processes=1))
    assert done.returncode == 0, done.stderr[-3000:]
    fsdp1 = load_file(tmp_path / "fsdp1/final/model.safetensors")
    for name, value in runs["single"]["params"].items():
        assert value.dtype == runs["fsdp"]["params"][name].dtype == torch.float32
        torch.testing.assert_close(runs["ddp"]["params"][name], value, rtol=0, atol=1e-5, msg=f"ddp {name}")
        torch.testing.assert_close(runs["fsdp"]["params"][name], fsdp1[name], rtol=0, atol=1e-5, msg=f"fsdp {name}")
    # bf16 gathers round the weights autocast would round too; the rest (the residual stream
    # between units) is bf16 as well, and the model still scores as autocast's does
    loss = {kind: runs[kind]["summary"]["eval_loss_after"] for kind in ("single", "fsdp")}
    assert abs(loss["fsdp"] - loss["single"]) <= 0.02 * loss["single"], loss


@pytest.mark.slow
@pytest.mark.parametrize("denoise", [False, True], ids=["plain", "denoised"])
def test_lora_on_two_processes_matches_one(tmp_path, denoise):
    """LoRA under FSDP2, ZeRO-3 and ZeRO-2: the merged final/ and final/adapter/ equal one process's.
    The plain case also generates during training, every rank stepping the partitioned forward in
    lockstep."""
    extra = ["model.lora_rank=4", "model.lora_targets=[q_proj,v_proj,down_proj]"]
    if denoise:
        extra += ["denoise.enabled=true", "denoise.lora=true"]
    else:
        extra += ["log_every=1", "generation.every=3", "generation.max_inputs=2", "generation.num_beams=2", "generation.max_new_tokens=8"]
    runs = {kind: _launch(kind, tmp_path / kind, extra) for kind in ("single", "fsdp", "zero3", "deepspeed")}
    single = runs["single"]
    adapter = load_file(tmp_path / "single/final/adapter/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    for kind in ("fsdp", "zero3", "deepspeed"):
        assert runs[kind]["summary"]["epsilon"] == single["summary"]["epsilon"]
        for name, value in single["params"].items():
            torch.testing.assert_close(runs[kind]["params"][name], value, rtol=0, atol=1e-5, msg=f"{kind}: {name}")
        theirs = load_file(tmp_path / kind / "final/adapter/adapter_model.safetensors")
        assert set(theirs) == set(adapter)
        for name, value in adapter.items():
            torch.testing.assert_close(theirs[name], value, rtol=0, atol=1e-5, msg=f"{kind}: {name}")
    if denoise:
        expected = [r["denoised_fraction"] for r in single["rows"] if "denoised_fraction" in r]
        assert max(expected) > 0
        for kind in ("fsdp", "zero3"):
            assert [r["denoised_fraction"] for r in runs[kind]["rows"] if "denoised_fraction" in r] == expected
    else:
        predictions = (tmp_path / "single/predictions_step3.txt").read_text()
        for kind in ("fsdp", "zero3"):
            assert predictions.strip() and (tmp_path / kind / "predictions_step3.txt").read_text() == predictions
            scores = [r["scores"] for r in runs[kind]["rows"] if "scores" in r]
            assert scores == [r["scores"] for r in single["rows"] if "scores" in r] and scores


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_workers_exit_when_their_launcher_is_killed(tmp_path, kind):
    """SIGKILL reaches the launcher alone (as when a job scheduler kills it): its workers must not
    train on, writing into an output folder that a resumed run will own."""
    args = [*TINY, "max_steps=100000", f"output_dir={tmp_path}"]
    if kind == "deepspeed":
        args = ["--recipe", RECIPE, *args]
    proc = subprocess.Popen(command(kind, args), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = tmp_path / "metrics.jsonl"
        deadline = time.time() + 300
        while not (log.exists() and '"epsilon"' in log.read_text()) and time.time() < deadline:
            time.sleep(0.1)  # until training has started
        launched = psutil.Process(proc.pid).children(recursive=True)
        workers = [p for p in launched if "launch/e2e.py" in p.cmdline()[1:3]]  # python [-u] launch/e2e.py
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(launched, timeout=30)  # DeepSpeed's per-node launch process included
        assert not alive, [p.pid for p in alive]
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["privacy.secure_mode=true"]], ids=["secret_default", "secure_mode"])
def test_ranks_share_one_poisson_sample_from_rank_0s_secret(tmp_path, mode):
    """Each rank draws its own os.urandom root; only rank 0's, broadcast, may seed the sample. Ranks
    with their own samples would clip every other example of different batches: the examples
    clipped (summed over ranks) would not be the logical batch rank 0 drew."""
    run = _launch("ddp", tmp_path, ["privacy.noise_seed=null", "max_steps=6", *mode])
    steps = [r for r in run["rows"] if "batch_size" in r]
    assert len(steps) == 6 and all(r["samples"] == r["batch_size"] for r in steps), steps


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["model.lora_rank=4"]], ids=["full", "lora"])
def test_two_torchrun_nodes_match_one_process(tmp_path, lora):
    """Multi-node: two torchrun invocations on this machine (one process each, c10d rendezvous on
    127.0.0.1) train like one process, LoRA included."""
    single = _launch("single", tmp_path / "single", lora)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        start(
            [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "dpllm-two-nodes",
             "launch/e2e.py", "--engine", "fsdp", "--recipe", RECIPE, *TINY, "max_steps=3", f"output_dir={tmp_path / 'nodes'}",
             *lora],
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        done = finish(node)
        assert done.returncode == 0, done.stdout[-3000:]
    summary = json.loads((tmp_path / "nodes/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epsilon"] == single["summary"]["epsilon"]
    params = load_file(tmp_path / "nodes/final/model.safetensors")
    for name, value in single["params"].items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_zero3_with_a_layer_without_a_per_sample_rule_is_refused_on_every_rank(tmp_path):
    """Gemma's RMSNorm scales by (1 + w): no rule bounds it, so every rank stops with the error
    naming the module (before ZeRO-3 partitions anything) instead of one rank hanging."""
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM

    tok = AutoTokenizer.from_pretrained(REPO / "assets/models/stories260K")
    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GemmaForCausalLM(config).save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")
    args = ["--recipe", RECIPE, *TINY, "max_steps=1", f"output_dir={tmp_path / 'out'}", f"model.name_or_path={tmp_path / 'gemma'}"]
    done = run(command("zero3", args), timeout=300)
    assert done.returncode != 0
    assert done.stdout.count("GemmaRMSNorm") + done.stderr.count("GemmaRMSNorm") >= 2  # both ranks name it
    assert "have no per-sample gradient rule" in done.stdout + done.stderr


ZOSO_ZOPO = ["zo.stages=3", "zo.stage_steps=1", "zo.mu_end=1e-4", "zo.regularization=0.5", "zo.select_fraction=0.3", "zo.select_queries=2"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], ZOSO_ZOPO], ids=["dpzero", "zoso_zopo"])
def test_zeroth_order_on_two_processes_matches_one(tmp_path, variant):
    """DP zeroth-order, 2 directions per step, Poisson shares unequal across ranks: replicated
    (ddp) and sharded (FSDP2 and ZeRO-3, each rank perturbing its own shard or partition) runs end
    where one process ends; with DP-ZOSO's stages and DP-ZOPO's selection too (each rank selecting
    within its shard)."""
    extra = [
        "algorithm=dp_zo", "zo.directions=2", "zo.lr=0.01", "batch_size=3", "micro_batch_size=1", "max_steps=4",
        "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", *variant,
    ]
    single = _launch("single", tmp_path / "single", extra)
    start = load_file(REPO / "assets/models/stories260K/model.safetensors")
    assert max(float((single["params"][n] - start[n]).abs().max()) for n in start) > 1e-4  # it did train
    if variant:  # the stages ran (lr halving at steps 1 and 3), and 30% of the entries moved, no other
        assert [r["zo_lr"] for r in single["rows"] if "zo_lr" in r] == [0.01, 0.005, 0.005, 0.0025]
        moved = sum(int((single["params"][n] != start[n]).sum()) for n in start)
        assert 0.29 < moved / sum(v.numel() for v in start.values()) <= 0.3
    for kind in ("ddp", "fsdp", "zero3"):
        run = _launch(kind, tmp_path / kind, extra)
        assert run["summary"]["world_size"] == 2 and run["summary"]["epsilon"] == single["summary"]["epsilon"]
        sizes = [r["batch_size"] for r in run["rows"] if "batch_size" in r]
        assert sizes == [r["batch_size"] for r in single["rows"] if "batch_size" in r] and any(n % 2 for n in sizes)
        for name, value in single["params"].items():
            torch.testing.assert_close(run["params"][name], value, rtol=0, atol=1e-5, msg=f"{kind}: {name}")


@pytest.mark.slow
def test_lmo_on_two_processes_matches_one(tmp_path):
    """LMO-DP's Laplace noise of random scale comes from the same keyed streams as the Gaussian's,
    and its L1 clip runs in the same clipper: FSDP2 (two_pass), ZeRO-2 and ZeRO-3 (book_keeping,
    its per-layer L1 pass on the gathered weights) end where one process ends."""
    extra = ["privacy.mechanism=lmo", "lmo.a1=0.5", "lmo.k=2", "lmo.a4=0.5", "lmo.lo=0.5", "lmo.hi=1.5", "batch_size=5", "micro_batch_size=2"]
    single = _launch("single", tmp_path / "single", extra)
    assert single["summary"]["mechanism"] == "lmo" and single["summary"]["clip_norm"] == "l1"
    start = load_file(REPO / "assets/models/stories260K/model.safetensors")
    assert max(float((single["params"][n] - start[n]).abs().max()) for n in start) > 1e-4  # it did train
    for kind, more in (("fsdp", ["privacy.clipping=two_pass"]), ("deepspeed", []), ("zero3", [])):
        run = _launch(kind, tmp_path / kind, extra + more)
        assert run["summary"]["world_size"] == 2 and run["summary"]["epsilon"] == single["summary"]["epsilon"]
        for name, value in single["params"].items():
            torch.testing.assert_close(run["params"][name], value, rtol=0, atol=1e-5, msg=f"{kind}: {name}")
