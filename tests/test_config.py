import glob
from pathlib import Path

import pytest

from dpllm.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted(glob.glob(str(REPO / "recipes/**/*.yaml"), recursive=True)))
def test_every_recipe_validates_and_shows_its_launch_command(recipe):
    config = load_config(recipe)
    assert isinstance(config, RunConfig)
    header = Path(recipe).read_text().split("\n\n")[0]
    assert "launch/" in header and Path(recipe).relative_to(REPO).as_posix() in header


def test_overrides_are_typed():
    config = load_config(REPO / "recipes/e2e/tiny_cpu.yaml", ["seed=7", "max_steps=3", "output_dir=x", "privacy.max_grad_norm=2"])
    assert (config.seed, config.max_steps, config.output_dir, config.privacy.max_grad_norm) == (7, 3, "x", 2.0)
    assert isinstance(config.privacy.max_grad_norm, float)


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 would read 1e-4 as a string; in recipes and overrides it is the number."""
    recipe = tmp_path / "r.yaml"
    text = (REPO / "recipes/e2e/tiny_cpu.yaml").read_text()
    assert "  lr: 0.003\n" in text
    recipe.write_text(text.replace("  lr: 0.003\n", "  lr: 5e-4\n"))
    config = load_config(recipe, ["privacy.delta=1e-6", "optim.betas=[0.9, 9.99E-1]", "privacy.max_grad_norm=+2e+1"])
    assert (config.optim.lr, config.privacy.delta) == (float("5e-4"), float("1e-6"))
    assert (config.optim.betas, config.privacy.max_grad_norm) == ([0.9, 0.999], 20.0)
    with pytest.raises(ConfigError, match="seed: expected int"):
        load_config(recipe, ["seed=1e3"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("sede=1", r"unknown key\(s\) sede"),
        ("privacy.epsilon=3", r"unknown key\(s\) privacy\.epsilon"),
        ("seed=abc", "seed: expected int"),
        ("privacy.enabled=maybe", "privacy.enabled: expected true/false"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm: must be > 0"),
        ("privacy.target_epsilon=null", r"set target_epsilon \(the budget\), noise_multiplier, or both"),
        ("engine=tpu", "engine: must be one of"),
        ("deepspeed_config=ds_configs/zero2.json", "deepspeed_config: is set exactly when engine is deepspeed"),
        ("checkpoint_every=-1", "checkpoint_every: must be >= 0"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon: must be > 0"),
        ("privacy.delta=1.5", "privacy.delta"),
        ("privacy.accountant=moments", "privacy.accountant"),
        ("optim.name=lion", "optim.name"),
        ("max_steps=0", "max_steps: must be > 0"),
        ("seed", "not key=value"),
        ("denoise.kappa=0", "denoise.kappa: must be > 0"),
        ("log_every=7", "eval_every: must be a multiple of log_every"),
        ("denoise.norm_correction=max", "denoise.norm_correction"),
        ("denoise.method=lanczos", "denoise.method"),
        ("denoise.start=-1", "denoise.start: must be >= 0"),
        ("privacy.max_grad_norm=.inf", "privacy.max_grad_norm: must be a finite number"),
        ("optim.lr=.nan", "optim.lr: must be a finite number"),
        ("optim.betas=[0.9, 1e0]", r"optim.betas: must be in \[0, 1\)"),
        ("optim.weight_decay=-1e-2", "optim.weight_decay: must be >= 0"),
        ("optim.momentum=-0.5", "optim.momentum: must be >= 0"),
        ("eval_batch_size=0", "eval_batch_size: must be > 0"),
        ("model.lora_alpha=0", "model.lora_alpha: must be > 0"),
        ("precision=bf16", "precision: must be one of"),
    ],
)
def test_bad_config_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(REPO / "recipes/e2e/tiny_cpu.yaml", [override])


def test_sigma_zero_with_privacy_on_is_refused():
    with pytest.raises(ConfigError, match="noise_multiplier: must be > 0"):
        load_config(REPO / "recipes/e2e/tiny_cpu.yaml", ["privacy.target_epsilon=null", "privacy.noise_multiplier=0"])


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "ds_configs/*.json"))))
def test_deepspeed_configs_parse(path, monkeypatch):
    import json

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    config = DeepSpeedConfig(json.loads(Path(path).read_text()), mpu=None)
    assert config.zero_optimization_stage in (1, 2, 3)  # the stages the private step supports
    assert config.gradient_clipping == 0.0  # clipping is per-sample, done by dpllm, never by DeepSpeed


def test_denoising_needs_privacy():
    with pytest.raises(ConfigError, match="denoise.enabled"):
        load_config(REPO / "recipes/e2e/tiny_cpu.yaml", ["denoise.enabled=true", "privacy.enabled=false"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["engine=ddp", "privacy.enabled=false"], "privacy.enabled: false .* engine single only"),
        (["engine=fsdp", "denoise.enabled=true", "denoise.diagnostics=true"], "denoise.diagnostics: needs the whole clipped gradient"),
        (["engine=deepspeed", "deepspeed_config=ZERO0"], "deepspeed_config: .*ZeRO stage 0 is not supported"),
        (["engine=deepspeed", "deepspeed_config=/nonexistent/ds.json"], "deepspeed_config: cannot read /nonexistent/ds.json"),
    ],
)
def test_engine_claims_of_the_readme_fail_before_anything_loads(tmp_path, overrides, key):
    zero0 = tmp_path / "zero0.json"
    zero0.write_text('{"zero_optimization": {"stage": 0}}')
    overrides = [o.replace("ZERO0", str(zero0)) for o in overrides]
    with pytest.raises(ConfigError, match=key):  # load_config reads no model or data
        load_config(REPO / "recipes/e2e/tiny_cpu.yaml", overrides)


def test_bf16_mixed_needs_fp32_weights():
    recipe = REPO / "recipes/e2e/tiny_cpu.yaml"
    assert load_config(recipe, ["precision=bf16-mixed"]).precision == "bf16-mixed"
    with pytest.raises(ConfigError, match="precision: bf16-mixed keeps fp32 weights: set model.dtype=float32"):
        load_config(recipe, ["precision=bf16-mixed", "model.dtype=bfloat16"])
    for engine in ("ddp", "fsdp"):
        assert load_config(recipe, ["precision=bf16-mixed", f"engine={engine}"]).run_precision == "bf16-mixed"


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_under_deepspeed_its_config_decides_the_precision(precision):
    """A recipe's precision runs unchanged with either DeepSpeed config: the config's bf16 section wins."""
    recipe = REPO / "recipes/e2e/tiny_cpu.yaml"
    for ds, expected in (("zero2.json", "fp32"), ("zero2_bf16.json", "bf16-mixed"), ("zero3_bf16.json", "bf16-mixed")):
        config = load_config(recipe, [f"precision={precision}", "engine=deepspeed", f"deepspeed_config={REPO / 'ds_configs' / ds}"])
        assert config.run_precision == expected, ds
    assert load_config(recipe, [f"precision={precision}"]).run_precision == precision


def test_clipping_mode_resolves_from_checkpointing_on_every_engine_and_refuses_unknown_modes():
    recipe = REPO / "recipes/e2e/tiny_cpu.yaml"
    assert load_config(recipe, []).clipping_mode == "book_keeping"
    assert load_config(recipe, ["model.gradient_checkpointing=true"]).clipping_mode == "two_pass"
    zero = {stage: ["engine=deepspeed", f"deepspeed_config={REPO / f'ds_configs/zero{stage}.json'}"] for stage in (2, 3)}
    for engine in (["engine=fsdp"], ["engine=ddp"], zero[2], zero[3]):
        assert load_config(recipe, ["model.gradient_checkpointing=true", *engine]).clipping_mode == "two_pass"
    assert load_config(recipe, ["privacy.clipping=two_pass", *zero[3]]).clipping_mode == "two_pass"
    with pytest.raises(ConfigError, match="privacy.clipping: must be one of"):
        load_config(recipe, ["privacy.clipping=ghost"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["zo.mu=0"], "zo.mu: must be > 0"),
        (["zo.mu=-0.001"], "zo.mu: must be > 0"),
        (["zo.directions=0"], "zo.directions: must be >= 1"),
        (["zo.lr=0"], "zo.lr: must be > 0"),
        (["zo.stages=0"], "zo.stages: must be >= 1"),
        (["zo.stages=3"], "zo.stage_steps: must be >= 1 with several zo.stages"),
        (["zo.mu_end=0"], "zo.mu_end: must be > 0"),
        (["zo.regularization=-1"], "zo.regularization: must be >= 0"),
        (["zo.select_fraction=0"], "zo.select_fraction: must be in \\(0, 1\\]"),
        (["zo.select_fraction=1.5"], "zo.select_fraction: must be in \\(0, 1\\]"),
        (["zo.select_queries=0"], "zo.select_queries: must be >= 1"),
        (["denoise.enabled=true"], "denoise.enabled: dp_zo noises one scalar per direction: there is no gradient matrix"),
        (["privacy.enabled=false"], "privacy.enabled: dp_zo is the private zeroth-order step"),
        (["engine=deepspeed", "deepspeed_config=ds_configs/zero2.json"], "engine: dp_zo runs single, under torchrun .* or DeepSpeed ZeRO-3"),
    ],
)
def test_zeroth_order_refuses_what_it_cannot_do(overrides, key, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=key):
        load_config(REPO / "recipes/e2e/tiny_cpu.yaml", ["algorithm=dp_zo", *overrides])


def test_unknown_algorithm_is_refused():
    with pytest.raises(ConfigError, match="algorithm: must be one of"):
        load_config(REPO / "recipes/e2e/tiny_cpu.yaml", ["algorithm=zo"])


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["privacy.clip_norm=l2"], "privacy.clip_norm: lmo's accounting bounds the L1 sensitivity"),
        (["denoise.enabled=true"], "denoise.enabled: the denoiser's bulk-edge threshold assumes Gaussian noise"),
        (["algorithm=dp_zo"], "privacy.mechanism: lmo noises L1-clipped gradients"),
        (["lmo.a1=-0.5"], "lmo.a1 must be a finite weight >= 0"),
        (["lmo.a1=1", "lmo.theta=0"], "lmo.theta must be finite and > 0"),
        (["lmo.a4=0"], "U is 0"),
        (["lmo.mixture=missing.json"], "lmo.mixture: cannot read"),
    ],
)
def test_lmo_refuses_what_its_guarantee_does_not_cover(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(REPO / "recipes/e2e/tiny_cpu.yaml", ["privacy.mechanism=lmo", *overrides])


def test_clip_norm_follows_the_mechanism():
    tiny = REPO / "recipes/e2e/tiny_cpu.yaml"
    assert load_config(tiny).clip_norm == "l2"
    assert load_config(tiny, ["privacy.mechanism=lmo"]).clip_norm == "l1"
    assert load_config(tiny, ["privacy.clip_norm=l1"]).clip_norm == "l1"  # sound for the Gaussian too: L2 <= L1
    with pytest.raises(ConfigError, match="privacy.mechanism: must be one of"):
        load_config(tiny, ["privacy.mechanism=laplace"])
