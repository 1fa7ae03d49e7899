"""The training loop end to end on tiny local models: logs, checkpoints, determinism, accounting."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from dpllm.config import load_config
from dpllm.privacy.accounting import compute_epsilon
from dpllm.training.trainer import train
from tests.conftest import save_tiny_bert, tiny_config

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "assets/models/stories260K"
RECIPE = REPO / "recipes/e2e/tiny_cpu.yaml"


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    """Tiny random Llama and Qwen2 checkpoints saved locally, with the embedded 512-token tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    paths = {}
    for family, tied in (("llama", True), ("qwen2", False)):
        torch.manual_seed(0)
        cfg = tiny_config(family, tied=tied, hidden=32, vocab=512)
        cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
        model = AutoModelForCausalLM.from_config(cfg)
        path = root / family
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[family] = path
    return paths


def run(tmp_path, model_path, *extra):
    overrides = [
        f"model.name_or_path={model_path}",
        f"data.train_file={REPO / 'assets/data/e2e/train.csv'}",
        f"data.eval_file={REPO / 'assets/data/e2e/dev.csv'}",
        "data.max_train_examples=200",
        "data.max_eval_examples=20",
        "data.max_length=64",
        "batch_size=16",
        "micro_batch_size=8",
        "max_steps=4",
        "eval_every=0",
        "progress=false",
        "generation.at_end=false",
        f"output_dir={tmp_path}",
        *extra,
    ]
    config = load_config(RECIPE, overrides)
    return config, train(config)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_run_writes_logs_model_and_spends_what_it_reports(tmp_path, local_models, family):
    config, summary = run(tmp_path, local_models[family])
    steps = [r for r in read_rows(tmp_path / "metrics.jsonl") if r.get("step", 0) > 0 and "epsilon" in r]
    diagnostics = [r for r in read_rows(tmp_path / "diagnostics/metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [r["step"] for r in diagnostics] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in diagnostics) and all(r["epsilon"] > 0 for r in steps)
    assert [r["epsilon"] for r in steps] == sorted(r["epsilon"] for r in steps)
    q = 16 / 200
    eps = compute_epsilon(summary["noise_multiplier"], q, 4, 1 / 400)
    assert summary["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert 0.99 * 8.0 <= eps <= 8.0  # calibrated for these 4 steps at this delta: spends the budget, no more
    assert steps[-1]["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert (tmp_path / "training.png").stat().st_size > 1000
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert AutoTokenizer.from_pretrained(tmp_path / "final").vocab_size == 512
    assert summary["eval_loss_after"] is not None and math.isfinite(summary["eval_loss_after"])
    assert reloaded.config.model_type == family
    report = json.loads((tmp_path / "final/privacy.json").read_text())
    assert report["epsilon"] == summary["epsilon"] and report["steps"] == 4 and report["seed_secret"] is True
    assert (report["sample_rate"], report["delta"], report["max_grad_norm"]) == (q, 1 / 400, 1.0)
    assert report["noise_multiplier"] == summary["noise_multiplier"] and report["unit"] == "one training row"
    assert "secret seed" in (tmp_path / "final/PRIVACY.md").read_text()


def test_fixed_noise_seed_reproduces_and_the_default_does_not(tmp_path, local_models):
    def final_params(sub, *extra):
        run(tmp_path / sub, local_models["llama"], "seed=1", *extra)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / sub / "final")
        return torch.cat([p.flatten() for p in model.parameters()])

    a, b = final_params("a", "privacy.noise_seed=5"), final_params("b", "privacy.noise_seed=5")
    c, d = final_params("c"), final_params("d")
    assert torch.equal(a, b)
    assert not torch.equal(c, d) and not torch.equal(a, c)
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert summary["seed_secret"] is False
    assert "holds only while that number stays secret" in (tmp_path / "a/final/PRIVACY.md").read_text()


@pytest.mark.slow
def test_generation_scores_during_and_after_training(tmp_path, local_models):
    gen = ["generation.every=2", "generation.max_inputs=4", "generation.num_beams=2", "generation.max_new_tokens=8"]
    _, summary = run(tmp_path, local_models["llama"], "generation.at_end=true", *gen)
    scored = [r for r in read_rows(tmp_path / "metrics.jsonl") if "scores" in r]
    assert [r["step"] for r in scored] == [2, 4]  # the last step's scores are reused, not recomputed
    assert summary["scores"] == scored[-1]["scores"]
    assert set(summary["scores"]) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["scores"] == summary["scores"] and results["epsilon"] == summary["epsilon"]
    for step in (2, 4):
        assert len((tmp_path / f"predictions_step{step}.txt").read_text().splitlines()) == 4
    references = (tmp_path / "references.txt").read_text().split("\n\n")
    assert len(references) == 4 and len((tmp_path / "inputs.txt").read_text().splitlines()) == 4
    assert (tmp_path / "scores.png").stat().st_size > 1000


def test_training_reduces_eval_loss_on_real_pretrained_model(tmp_path):
    """The embedded pretrained Llama learns E2E under epsilon 8 in a handful of steps.

    At this learning rate and batch the drop is 0.87-1.19 over seeds 0, 1, 5, 7, 9, 11; at
    lr 0.005 and batch 32 it ranged 0.07-0.94 with the noise draw, too wide for a threshold.
    """
    _, summary = run(
        tmp_path,
        REPO / "assets/models/stories260K",
        "max_steps=12",
        "optim.lr=0.002",
        "data.max_train_examples=1000",
        "batch_size=64",
    )
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5


@pytest.mark.slow
def test_bf16_mixed_learns_like_fp32_and_keeps_fp32_weights(tmp_path):
    """20 steps of the embedded pretrained Llama under bf16 autocast: the eval loss within 2% of
    the fp32 run's (same sample and noise), and the weights checkpointed and saved in fp32."""
    from safetensors.torch import load_file

    common = ["max_steps=20", "optim.lr=0.002", "data.max_train_examples=1000", "batch_size=32", "micro_batch_size=16",
              "privacy.noise_seed=5", "checkpoint_every=20"]
    _, fp32 = run(tmp_path / "fp32", REPO / "assets/models/stories260K", *common)
    _, mixed = run(tmp_path / "mixed", REPO / "assets/models/stories260K", *common, "precision=bf16-mixed")
    assert mixed["eval_loss_after"] < mixed["eval_loss_before"] - 0.5  # it learned
    assert abs(mixed["eval_loss_after"] - fp32["eval_loss_after"]) <= 0.02 * fp32["eval_loss_after"]
    for folder in ("checkpoints/step_20/model", "final"):
        weights = load_file(tmp_path / "mixed" / folder / "model.safetensors")
        assert weights and all(w.dtype == torch.float32 for w in weights.values())


def test_lora_run(tmp_path, local_models):
    """Only the adapted matrices move, each by a rank-4 update, and final/ is the merged model (no peft needed)."""
    config, summary = run(tmp_path, local_models["llama"], "model.lora_rank=4")
    assert math.isfinite(summary["eval_loss_after"])
    base = dict(AutoModelForCausalLM.from_pretrained(local_models["llama"]).named_parameters())
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "final").named_parameters())
    assert set(merged) == set(base)
    for name, p in merged.items():
        delta = (p - base[name]).detach()
        if name.endswith(("q_proj.weight", "v_proj.weight")):  # the default lora_targets
            assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= 4, name
        else:
            assert torch.equal(p, base[name]), name
    # final/adapter/ is the adapter alone, in peft's form: applied to the base model by peft, it gives final/
    from peft import PeftModel

    applied = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_models["llama"]), tmp_path / "final/adapter")
    for name, p in applied.merge_and_unload().named_parameters():
        torch.testing.assert_close(p, merged[name], rtol=0, atol=1e-6, msg=name)


def test_lora_targets_that_match_nothing_are_refused(tmp_path, local_models):
    with pytest.raises(ValueError, match=r"model.lora_targets=\['nowhere'\] match no module"):
        run(tmp_path, local_models["llama"], "model.lora_rank=4", "model.lora_targets=[nowhere]")


def test_non_private_baseline_run(tmp_path, local_models):
    _, summary = run(tmp_path, local_models["llama"], "privacy.enabled=false")
    assert summary["epsilon"] is None and math.isfinite(summary["eval_loss_after"])


def test_rows_all_cut_before_their_targets_are_refused(tmp_path, local_models):
    with pytest.raises(ValueError, match="no training row keeps a target token within data.max_length=8"):
        run(tmp_path, local_models["llama"], "data.max_length=8")


def test_batch_larger_than_dataset_is_refused(tmp_path, local_models):
    with pytest.raises(ValueError, match="exceeds"):
        run(tmp_path, local_models["llama"], "batch_size=500")


def test_denoised_run_logs_denoising_and_spends_the_same_epsilon(tmp_path, local_models):
    _, plain = run(tmp_path / "plain", local_models["llama"])
    _, denoised = run(tmp_path / "den", local_models["llama"], "denoise.enabled=true", "denoise.diagnostics=true")
    assert denoised["epsilon"] == plain["epsilon"]  # post-processing: the same privacy
    steps = [r for r in read_rows(tmp_path / "den/metrics.jsonl") if r.get("step", 0) > 0 and "epsilon" in r]
    assert len(steps) == 4 and all(0 <= r["denoised_fraction"] <= 1 and "cos_gain" not in r for r in steps)
    diagnostics = [r for r in read_rows(tmp_path / "den/diagnostics/metrics.jsonl") if "loss" in r]
    assert len(diagnostics) == 4 and all("cos_gain" in r for r in diagnostics)
    assert (tmp_path / "den/denoising.png").stat().st_size > 1000


def test_truncations_are_counted_and_a_large_delta_warns(tmp_path, local_models, caplog):
    from dpllm.tasks import e2e
    from dpllm.tasks.data2text import tokenize

    with caplog.at_level("WARNING", logger="dpllm"):
        run(tmp_path, local_models["llama"], "privacy.delta=0.01", "data.max_length=150")
    assert "privacy.delta=0.01 is not below 1/N=0.005" in caplog.text
    header = read_rows(tmp_path / "diagnostics/metrics.jsonl")[1]  # after the line that says what the file is
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = e2e.load(REPO / "assets/data/e2e/train.csv", max_examples=200)
    expected = sum(tokenize(r, tok, 150)[1] for r in rows)
    assert header["truncated_train"] == expected and 0 < expected < 200


def test_glue_classification_run_on_a_local_bert(tmp_path):
    """The same loop trains a BERT sequence classifier privately and reports dev accuracy."""
    bert = save_tiny_bert(tmp_path / "bert", REPO / "assets/data/glue/SST-2", dropout=0.1)
    config = load_config(
        REPO / "recipes/glue/minilm_sst2_cpu.yaml",
        [
            f"model.name_or_path={bert}",
            "model.freeze=[]",
            f"data.train_file={REPO / 'assets/data/glue/SST-2'}",
            f"data.eval_file={REPO / 'assets/data/glue/SST-2'}",
            "data.max_train_examples=300",
            "data.max_eval_examples=50",
            "batch_size=32",
            "micro_batch_size=16",
            "max_steps=3",
            "log_every=1",
            "eval_every=3",
            "denoise.enabled=true",
            "progress=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    summary = train(config)
    assert 0 <= summary["eval_accuracy_after"] <= 1 and summary["eval_accuracy_before"] is not None
    assert summary["epsilon"] == pytest.approx(compute_epsilon(summary["noise_multiplier"], 32 / 300, 3, 1 / 600), rel=1e-9)
    rows = read_rows(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 3]
    assert sum("denoised_fraction" in r for r in rows) == 3
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run/final")
    assert reloaded.config.num_labels == 2


def test_startup_checks_run_on_short_prefixes_of_the_two_shortest_rows():
    """The probe rows: the two shortest, cut to a prefix that still holds a target token."""
    from dpllm.training.trainer import _probe_rows

    lm = [{"input_ids": list(range(n)), "labels": [-100] * prompt + list(range(prompt, n))} for n, prompt in ((900, 100), (300, 10), (500, 5))]
    rows = _probe_rows(lm, max_tokens=64)
    assert [len(r["input_ids"]) for r in rows] == [64, 64]  # the rows of 300 and 500 tokens, cut
    assert all(len(r["labels"]) == 64 and any(label != -100 for label in r["labels"]) for r in rows)
    long_prompt = _probe_rows([{"input_ids": list(range(900)), "labels": [-100] * 100 + [7] * 800}] * 2, max_tokens=64)
    assert [len(r["input_ids"]) for r in long_prompt] == [102, 102] and long_prompt[0]["labels"][100] == 7
    # Rows truncated before their target (loss 0) would let every check pass unexamined: skipped
    cut = [{"input_ids": list(range(64)), "labels": [-100] * 64}] * 3 + [lm[1], lm[2]]
    assert [any(label != -100 for label in r["labels"]) for r in _probe_rows(cut, max_tokens=64)] == [True, True]
    classification = _probe_rows([{"input_ids": list(range(90)), "label": 1}, {"input_ids": [1, 2], "label": 0}], max_tokens=64)
    assert classification == [{"input_ids": [1, 2], "label": 0}, {"input_ids": list(range(64)), "label": 1}]


def test_zeroth_order_tiny_recipe_through_the_launcher_spends_one_gaussian_per_direction(tmp_path):
    """The README's tiny E2E recipe with algorithm=dp_zo and 2 directions per step: epsilon is that
    of steps x directions Poisson-subsampled Gaussians (dp-accounting's own composition too)."""
    import dp_accounting

    from tests.launchers import TINY, command, run as launch

    out = tmp_path / "zo"
    done = launch(command("single", ["algorithm=dp_zo", "zo.directions=2", *TINY, "max_steps=4", f"output_dir={out}"]))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    sigma, q, delta = summary["noise_multiplier"], 16 / 200, 1 / 400
    assert (summary["algorithm"], summary["steps"], summary["sample_rate"], summary["delta"]) == ("dp_zo", 4, q, delta)
    assert summary["epsilon"] == pytest.approx(compute_epsilon(sigma, q, 4 * 2, delta), rel=1e-9)
    ref = dp_accounting.pld.PLDAccountant()
    ref.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 8))
    assert summary["epsilon"] == pytest.approx(ref.get_epsilon(delta), rel=1e-3)
    assert 0.99 * 8.0 <= summary["epsilon"] <= 8.0  # calibrated to the recipe's budget over the 8 mechanisms
    report = json.loads((out / "final/privacy.json").read_text())
    assert report["history"] == [[sigma, q, 8]] and (report["steps"], report["mechanisms_per_step"]) == (4, 2)
    diagnostics = [r for r in read_rows(out / "diagnostics/metrics.jsonl") if "samples" in r]
    assert len(diagnostics) == 4 and all(r["samples"] > 0 for r in diagnostics)
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(REPO / "assets/models/stories260K")
    moved = max(float((a - b).abs().max()) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
    assert moved > 1e-4 and math.isfinite(summary["eval_loss_after"])


def test_zeroth_order_learns_on_the_real_pretrained_model(tmp_path):
    """Zeroth-order steps learn far slower than DP-SGD's: 40 steps at epsilon 8 lower the eval
    loss by 0.11-0.22 over noise seeds 0-5; the noise is pinned (a secret draw made this test
    flaky) and the bound leaves a margin below the lowest."""
    _, summary = run(
        tmp_path, REPO / "assets/models/stories260K", "algorithm=dp_zo", "max_steps=40", "data.max_train_examples=1000", "batch_size=64",
        "privacy.noise_seed=0",
    )
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05


ZOSO_ZOPO = ["zo.stages=2", "zo.stage_steps=1", "zo.mu_end=1e-4", "zo.regularization=0.5", "zo.select_fraction=0.2", "zo.select_queries=2"]


@pytest.mark.parametrize("variant", [[], ZOSO_ZOPO], ids=["dpzero", "zoso_zopo"])
def test_zeroth_order_resumes_exactly(tmp_path, local_models, variant):
    """With DP-ZOPO the checkpoint keeps each rank's selection: the resumed command's other seed
    would select other entries, and its checkpoint's weights are no longer the base ones. The cut
    at step 2 falls inside DP-ZOSO's second stage (steps 1-3), so the regulariser's starting
    point comes from the checkpoint too."""
    common = [
        "algorithm=dp_zo", "zo.lr=0.01", "zo.directions=2", "privacy.noise_seed=4", "checkpoint_every=2",
        "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", *variant,
    ]
    run(tmp_path / "straight", local_models["llama"], *common)
    run(tmp_path / "cut", local_models["llama"], *common, "max_steps=2")
    # Other seeds on the resumed command: a restart would initialise, sample, noise and perturb differently
    run(tmp_path / "cut", local_models["llama"], *common, "seed=9", "privacy.noise_seed=8", f"resume={tmp_path / 'cut'}")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight/final")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut/final")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert json.loads((tmp_path / "cut/summary.json").read_text())["epsilon"] == json.loads((tmp_path / "straight/summary.json").read_text())["epsilon"]
    if variant:  # a checkpoint with a selection resumes only as a run with one, and the other way round
        with pytest.raises(ValueError, match="zo.select_fraction: the checkpoint was written by a run with a DP-ZOPO"):
            run(tmp_path / "cut", local_models["llama"], *common, "zo.select_fraction=1", "max_steps=6", f"resume={tmp_path / 'cut'}")


@pytest.mark.parametrize("algorithm", [["algorithm=dp_zo"], ["algorithm=dp_sgd"]], ids=["dp_zo", "dp_sgd"])
def test_a_model_that_mixes_samples_is_refused_at_startup(tmp_path, local_models, monkeypatch, algorithm):
    """A clipped scalar (or gradient) bounds one row's influence only if the row moves no other
    row's loss: the startup probe names the module that mixes, for both algorithms, also with
    the recipe's 64-token rows, most of which are cut before their target."""
    from torch import nn

    import dpllm.training.trainer as trainer
    from dpllm.privacy.rules import UnsupportedModuleError

    class BatchCentering(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    load = trainer.load_model_and_tokenizer

    def mixing(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        mlp = model.model.layers[1].mlp
        mlp.act_fn = nn.Sequential(mlp.act_fn, BatchCentering())
        return model, tokenizer

    monkeypatch.setattr(trainer, "load_model_and_tokenizer", mixing)
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.1\.mlp\.act_fn\.1' \(BatchCentering\) mixes samples"):
        run(tmp_path, local_models["llama"], *algorithm)


def test_lmo_tiny_recipe_through_the_launcher_reports_its_sound_epsilon(tmp_path):
    """The README's tiny E2E recipe with privacy.mechanism=lmo at target epsilon 8: the epsilon
    written is lmo.py's bound for the steps that ran, at most 8, never below dp-accounting's PLD
    of the Poisson-subsampled Laplace mechanism (the default law is a point mass), and final/ is saved."""
    import logging

    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    from dpllm.privacy import lmo
    from tests.launchers import TINY, command, run as launch

    out = tmp_path / "lmo"
    done = launch(command("single", ["privacy.mechanism=lmo", "privacy.target_epsilon=8", *TINY, "max_steps=4", f"output_dir={out}"]))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    s, q, delta = summary["noise_multiplier"], 16 / 200, 1 / 400
    assert (summary["mechanism"], summary["clip_norm"], summary["accountant"], summary["steps"]) == ("lmo", "l1", "lmo-rdp", 4)
    expected = lmo.epsilon(lmo.LMONoise.point_mass(1.0).scaled(1 / s), 1.0, q, 4, delta)
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-12) and 0.99 * 8 <= summary["epsilon"] <= 8
    logging.getLogger().setLevel(logging.ERROR)
    pld = pld_lib.from_laplace_mechanism(s, sensitivity=1.0, sampling_prob=q, value_discretization_interval=1e-4)
    assert summary["epsilon"] >= pld.self_compose(4).get_epsilon_for_delta(delta)
    report = json.loads((out / "final/privacy.json").read_text())
    assert report["clipping"] == "per-sample L1 norm of the whole gradient" and "Laplace" in report["mechanism"]
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    assert all(torch.isfinite(p).all() for p in trained.parameters())
