"""Typed, validated run configs loaded from YAML recipes plus ``key=value`` overrides.

Unknown keys, wrong types and impossible values are reported with the dotted key that holds
them, before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpllm.denoise.gradient import DEFAULT_INCLUDE, LORA_INCLUDE
from dpllm.denoise.rmt import NORM_CORRECTIONS
from dpllm.privacy.lmo import LMONoise, load_mixture
from dpllm.privacy.mechanisms import MECHANISMS
from dpllm.tasks import TASKS
from dpllm.tasks.glue import GLUE


ENGINES = ("single", "ddp", "fsdp", "deepspeed")
ALGORITHMS = ("dp_sgd", "dp_zo")
# dp_zo keeps no gradients or optimizer state: ZeRO-3 partitions its weights, ZeRO-1/2 would have
# nothing to partition (ddp replicates the weights as they would)
ZO_ENGINES = ("single", "ddp", "fsdp", "deepspeed")
PRECISIONS = ("fp32", "bf16-mixed")
CLIPPING_MODES = ("auto", "book_keeping", "two_pass")


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name_or_path: str = ""  # a hub name or a local folder in save_pretrained form
    dtype: str = "float32"
    lora_rank: int = 0  # > 0 trains LoRA adapters only
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names not to train
    # Hugging Face's activation checkpointing (non-reentrant): recompute each decoder layer in backward
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _require(bool(self.name_or_path), "model.name_or_path", "is required")
        _require(self.dtype in ("float32", "float64", "bfloat16", "float16"), "model.dtype", f"unknown dtype {self.dtype!r}")
        _require(self.lora_rank >= 0, "model.lora_rank", "must be >= 0")
        _require(self.lora_alpha > 0, "model.lora_alpha", "must be > 0")


@dataclass
class DataConfig:
    task: str = "e2e"  # e2e | dart (generation) or sst2 | qnli | qqp | mnli (classification)
    train_file: str = ""  # an official file, a folder holding the official files, or a hub name
    eval_file: str = ""
    train_split: str = "train"  # used for folders and hub names
    eval_split: str = "validation"
    max_length: int = 128  # prompt + target tokens; longer examples are truncated and counted
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    def validate(self) -> None:
        known = sorted(TASKS) + sorted(GLUE)
        _require(self.task in known, "data.task", f"unknown task {self.task!r}; known: {', '.join(known)}")
        _require(bool(self.train_file), "data.train_file", "is required")
        _require(self.max_length >= 2, "data.max_length", "must be >= 2")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"data.{key}", "must be > 0")


@dataclass
class GenerationConfig:
    """Generation and scoring (BLEU, ROUGE-L, ...) on the eval set's unique inputs."""

    every: int = 0  # also every k steps during training (0: only at the end)
    at_end: bool = True
    num_beams: int = 5  # 1 is greedy
    max_new_tokens: int = 100
    batch_size: int = 16
    max_inputs: int | None = None  # score only the first k unique inputs

    def validate(self) -> None:
        _require(self.every >= 0, "generation.every", "must be >= 0")
        _require(self.num_beams >= 1, "generation.num_beams", "must be >= 1")
        _require(self.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
        _require(self.batch_size >= 1, "generation.batch_size", "must be >= 1")
        _require(self.max_inputs is None or self.max_inputs > 0, "generation.max_inputs", "must be > 0")


@dataclass
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float | None = None  # the budget: sigma is calibrated to it unless given
    noise_multiplier: float | None = None  # sigma; with a target too, the plan must fit the budget
    delta: float | None = None  # default 1 / (2 N)
    max_grad_norm: float = 1.0
    accountant: str = "pld"
    # auto | book_keeping (one backward, each layer's per-sample factors kept to its end) |
    # two_pass (norms formed and dropped per layer, then a second backward forms the sums; what
    # activation checkpointing needs). auto: two_pass with model.gradient_checkpointing, else book_keeping
    clipping: str = "auto"
    # gaussian (DP-SGD) | lmo (LMO-DP: Laplace noise of random scale, the lmo section's law)
    mechanism: str = "gaussian"
    # the norm each sample's gradient is clipped in: l2 (the Gaussian's default) | l1 (lmo's, and
    # the only one it accepts: its accounting bounds L1 sensitivity)
    clip_norm: str | None = None
    # The noise streams and the Poisson sampler are seeded from os.urandom unless noise_seed is
    # given; the epsilon then assumes that number stays secret. It is never written to a
    # published file. secure_mode also keeps the seeds out of checkpoints.
    noise_seed: int | None = None
    secure_mode: bool = False
    diagnostics_log: bool = True  # write the non-private training statistics under diagnostics/
    # resume from a checkpoint whose privacy history differs (non-private, another dataset or
    # delta); the summary and privacy report record what differed
    accept_resume_mismatch: bool = False

    def validate(self) -> None:
        if not self.enabled:
            return
        _require(
            self.target_epsilon is not None or self.noise_multiplier is not None,
            "privacy",
            "set target_epsilon (the budget), noise_multiplier, or both",
        )
        _require(self.target_epsilon is None or self.target_epsilon > 0, "privacy.target_epsilon", "must be > 0")
        _require(
            self.noise_multiplier is None or self.noise_multiplier > 0,
            "privacy.noise_multiplier",
            "must be > 0 with privacy enabled (set privacy.enabled=false to train without privacy)",
        )
        _require(self.delta is None or 0 < self.delta < 1, "privacy.delta", "must be in (0, 1)")
        _require(self.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
        _require(self.accountant in ("pld", "rdp"), "privacy.accountant", "must be 'pld' or 'rdp'")
        _require(self.clipping in CLIPPING_MODES, "privacy.clipping", f"must be one of {CLIPPING_MODES}")
        _require(self.mechanism in MECHANISMS, "privacy.mechanism", f"must be one of {MECHANISMS}")
        _require(self.clip_norm in (None, "l2", "l1"), "privacy.clip_norm", "must be l2 or l1")
        _require(
            self.mechanism != "lmo" or self.clip_norm != "l2",
            "privacy.clip_norm",
            "lmo's accounting bounds the L1 sensitivity; an L2 clip allows an L1 norm sqrt(d) times larger "
            "(leave privacy.clip_norm out or set it to l1)",
        )
        _require(
            not (self.secure_mode and self.noise_seed is not None),
            "privacy.noise_seed",
            "cannot be combined with privacy.secure_mode, whose seeds never leave the process",
        )


@dataclass
class DenoiseConfig:
    """RMT denoising of the noisy gradient's projection matrices (post-processing, no privacy cost)."""

    enabled: bool = False
    kappa: float = 1.02
    norm_correction: str = "noisy"  # noisy | none | estimate
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))  # fnmatch patterns on parameter names
    exclude: list[str] = field(default_factory=list)
    lora: bool = False  # also denoise LoRA A/B matrices
    every: int = 1  # denoise on every k-th step
    start: int = 0  # first step (0-based) to denoise, e.g. to let Adam's moment estimates warm up first
    method: str = "auto"  # full | partial | auto
    diagnostics: bool = False  # logs cosines to the pre-noise gradient: NOT private, research only

    def validate(self) -> None:
        _require(self.kappa > 0, "denoise.kappa", "must be > 0")
        _require(self.norm_correction in NORM_CORRECTIONS, "denoise.norm_correction", f"must be one of {NORM_CORRECTIONS}")
        _require(self.every >= 1, "denoise.every", "must be >= 1")
        _require(self.start >= 0, "denoise.start", "must be >= 0")
        _require(self.method in ("full", "partial", "auto"), "denoise.method", "must be full, partial or auto")

    def options(self) -> dict:
        include = list(self.include) + (list(LORA_INCLUDE) if self.lora else [])
        return dict(
            include=include, exclude=self.exclude, kappa=self.kappa, norm_correction=self.norm_correction, method=self.method
        )


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def validate(self) -> None:
        _require(self.name in ("adamw", "sgd"), "optim.name", "must be 'adamw' or 'sgd'")
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(len(self.betas) == 2, "optim.betas", "must hold two numbers")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", "must be in [0, 1)")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(self.momentum >= 0, "optim.momentum", "must be >= 0")


@dataclass
class ZerothOrderConfig:
    """DP zeroth-order steps (``algorithm: dp_zo``): two forwards along seeded directions and one
    clipped scalar per sample; no backward, gradients or optimizer state. The ``optim`` section is
    not used: the update is plain SGD along the directions."""

    directions: int = 1  # per step, each on a Poisson sample of its own (one accounted mechanism each)
    mu: float = 1e-3  # smoothing: the two forwards run at theta + mu z and theta - mu z
    lr: float = 1e-6  # step size along the directions (MeZO's scale for billion-parameter models; tiny ones take far more)
    # DP-ZOSO's stagewise schedule; 1 stage is DPZero's constant lr and mu. Stage s (from 0) lasts
    # stage_steps * 2^s steps (the last to the end of the run), with lr / 2^s and mu falling
    # geometrically from mu to mu_end (null: constant)
    stages: int = 1
    stage_steps: int = 0
    mu_end: float | None = None
    regularization: float = 0.0  # lambda: theta -= lr lambda (theta - the stage's starting point); > 0 keeps a copy of it
    # DP-ZOPO's data-free selection: perturb and update only this fraction of the trainable
    # entries (1: all), chosen before training from select_queries zeroth-order queries per estimate
    select_fraction: float = 1.0
    select_queries: int = 8

    def validate(self) -> None:
        _require(self.directions >= 1, "zo.directions", "must be >= 1")
        _require(self.mu > 0, "zo.mu", "must be > 0 (the forwards at theta +- mu z would coincide)")
        _require(self.lr > 0, "zo.lr", "must be > 0")
        _require(self.stages >= 1, "zo.stages", "must be >= 1")
        _require(self.stages == 1 or self.stage_steps >= 1, "zo.stage_steps", "must be >= 1 with several zo.stages")
        _require(self.mu_end is None or self.mu_end > 0, "zo.mu_end", "must be > 0 (or null for a constant mu)")
        _require(self.regularization >= 0, "zo.regularization", "must be >= 0")
        _require(0 < self.select_fraction <= 1, "zo.select_fraction", "must be in (0, 1]")
        _require(self.select_queries >= 1, "zo.select_queries", "must be >= 1")


@dataclass
class LMOConfig:
    """LMO-DP's law of the inverse noise scale (``privacy.mechanism: lmo``):
    U = a1 Gamma(k, theta) + a3 Exp(lam) + a4 Uniform(lo, hi). The default, a point mass at 1, is
    plain Laplace noise. ``mixture``: a file launch/lmo_search.py wrote, used instead of the fields.
    The noise multiplier (calibrated to the target unless given) scales the law's noise."""

    mixture: str = ""
    a1: float = 0.0
    k: float = 1.0
    theta: float = 1.0
    a3: float = 0.0
    lam: float = 1.0
    a4: float = 1.0
    lo: float = 1.0
    hi: float = 1.0

    def law(self) -> LMONoise:
        if self.mixture:
            try:
                return load_mixture(self.mixture)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"lmo.mixture: cannot read a mixture from {self.mixture} ({e})") from None
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mixture"}
        try:
            return LMONoise(**fields)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def validate(self) -> None:
        self.law()


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # dp_sgd (per-sample gradients, clipped and noised) | dp_zo (zeroth-order: clipped and noised
    # directional derivatives, see the zo section)
    algorithm: str = "dp_sgd"
    zo: ZerothOrderConfig = field(default_factory=ZerothOrderConfig)
    lmo: LMOConfig = field(default_factory=LMOConfig)
    engine: str = "single"  # single | ddp (torchrun, replicated) | fsdp (torchrun, FSDP2) | deepspeed (ZeRO-1/2/3)
    # fp32 | bf16-mixed: training forwards and backwards under bf16 autocast, weights and optimizer state fp32
    # (FSDP2 also gathers its units in bf16, through its MixedPrecisionPolicy).
    # Under DeepSpeed its config's bf16 section decides (bf16 weights, fp32 master copy): see run_precision
    precision: str = "fp32"
    deepspeed_config: str = ""  # a DeepSpeed JSON config (launch/e2e.py --config sets it)
    batch_size: int = 32  # expected logical batch size: sample rate q = batch_size / N
    micro_batch_size: int = 16  # at most this many examples per forward/backward
    max_steps: int | None = None
    epochs: float | None = None
    seed: int = 0
    output_dir: str = "outputs/run"
    checkpoint_every: int = 0  # write checkpoints/step_N every k steps (0: never; a budget stop always writes one)
    resume: str = ""  # a checkpoint folder, or a run's output_dir to continue from its latest checkpoint
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batch_size: int = 32
    progress: bool = True

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed config's ZeRO stage (0 for other engines)."""
        return _zero_stage(self.deepspeed_config) if self.engine == "deepspeed" else 0

    @property
    def run_precision(self) -> str:
        """The precision the run trains in: ``precision``, except under DeepSpeed, whose config's
        bf16 section decides (a recipe then runs unchanged with ds_configs/zero2.json or
        zero2_bf16.json)."""
        if self.engine != "deepspeed":
            return self.precision
        return "bf16-mixed" if _ds_config(self.deepspeed_config).get("bf16", {}).get("enabled") else "fp32"

    @property
    def clipping_mode(self) -> str:
        """The clipper's mode ``privacy.clipping`` resolves to for this model and engine."""
        if self.privacy.clipping != "auto":
            return self.privacy.clipping
        return "two_pass" if self.model.gradient_checkpointing else "book_keeping"

    @property
    def clip_norm(self) -> str:
        """The norm per-sample gradients are clipped in: ``privacy.clip_norm`` or the mechanism's."""
        return self.privacy.clip_norm or ("l1" if self.privacy.mechanism == "lmo" else "l2")

    @property
    def mechanisms_per_step(self) -> int:
        """Poisson-subsampled Gaussians one step composes: one per zeroth-order direction."""
        return self.zo.directions if self.algorithm == "dp_zo" else 1

    @property
    def partitions_parameters(self) -> bool:
        """FSDP2 and ZeRO-3 keep each parameter in pieces across ranks: every forward needs them all."""
        return self.engine == "fsdp" or self.zero_stage == 3

    def validate(self) -> None:
        for section in (self.model, self.data, self.privacy, self.denoise, self.optim, self.generation, self.zo):
            section.validate()
        if self.privacy.mechanism == "lmo":
            self.lmo.validate()
            _require(
                not self.denoise.enabled, "denoise.enabled",
                "the denoiser's bulk-edge threshold assumes Gaussian noise; with privacy.mechanism=lmo set denoise.enabled=false",
            )
            _require(
                self.algorithm == "dp_sgd", "privacy.mechanism",
                "lmo noises L1-clipped gradients (algorithm dp_sgd); dp_zo's scalars are accounted as Gaussians",
            )
        _require(self.algorithm in ALGORITHMS, "algorithm", f"must be one of {ALGORITHMS}")
        if self.algorithm == "dp_zo":
            _require(
                not self.denoise.enabled, "denoise.enabled",
                "dp_zo noises one scalar per direction: there is no gradient matrix to denoise; set denoise.enabled=false",
            )
            _require(self.privacy.enabled, "privacy.enabled", "dp_zo is the private zeroth-order step; it needs privacy.enabled")
            _require(
                self.engine in ZO_ENGINES and self.zero_stage in (0, 3), "engine",
                "dp_zo runs single, under torchrun (--engine ddp or fsdp) or DeepSpeed ZeRO-3: it keeps no gradients or "
                "optimizer state for ZeRO-1/2 to partition (launch a replicated run with torchrun --engine ddp)",
            )
        _require(
            not self.denoise.enabled or self.privacy.enabled, "denoise.enabled", "needs privacy.enabled (there is no noise to remove)"
        )
        _require(
            not self.denoise.diagnostics or self.privacy.diagnostics_log,
            "denoise.diagnostics",
            "writes to the diagnostics log, which privacy.diagnostics_log=false turns off",
        )
        _require(self.engine in ENGINES, "engine", f"must be one of {ENGINES}")
        _require(
            (self.engine == "deepspeed") == bool(self.deepspeed_config),
            "deepspeed_config",
            "is set exactly when engine is deepspeed (launch with --config ds_configs/zero2.json)",
        )
        _require(
            self.privacy.enabled or self.engine == "single",
            "privacy.enabled",
            "false (the non-private baseline) runs with engine single only",
        )
        _require(
            not self.denoise.diagnostics or self.engine == "single",
            "denoise.diagnostics",
            "needs the whole clipped gradient in one process: run it with engine single",
        )
        _require(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        if self.precision == "bf16-mixed":
            _require(self.model.dtype == "float32", "precision", "bf16-mixed keeps fp32 weights: set model.dtype=float32")
            _require(
                self.engine in ("single", "ddp", "fsdp", "deepspeed"), "precision",
                "bf16-mixed runs on engines single, ddp and fsdp, and under DeepSpeed as its config's bf16 section says",
            )
        if self.engine == "deepspeed":
            stage = self.zero_stage
            _require(stage in (1, 2, 3), "deepspeed_config", f"{self.deepspeed_config}: ZeRO stage {stage} is not supported; use 1, 2 or 3")
        _require(self.batch_size > 0, "batch_size", "must be > 0")
        _require(self.micro_batch_size > 0, "micro_batch_size", "must be > 0")
        _require(self.eval_batch_size > 0, "eval_batch_size", "must be > 0")
        _require((self.max_steps is None) != (self.epochs is None), "max_steps", "set exactly one of max_steps and epochs")
        _require(self.max_steps is None or self.max_steps > 0, "max_steps", "must be > 0")
        _require(self.epochs is None or self.epochs > 0, "epochs", "must be > 0")
        _require(self.log_every > 0, "log_every", "must be > 0")
        _require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        _require(self.eval_every >= 0, "eval_every", "must be >= 0")
        _require(self.eval_every % self.log_every == 0, "eval_every", "must be a multiple of log_every (evaluations are logged rows)")
        _require(
            self.generation.every % self.log_every == 0, "generation.every", "must be a multiple of log_every (scores are logged rows)"
        )


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; recipes and overrides read it as a float,
    as YAML 1.2 and Python do, so ``optim.lr=1e-4`` means what it says."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _load_yaml(text):
    return yaml.load(text, Loader=_Loader)


def _ds_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"deepspeed_config: cannot read {path} as JSON ({e})") from None


def _zero_stage(path: str) -> int:
    return _ds_config(path).get("zero_optimization", {}).get("stage", 0)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _coerce(value, annotation, key: str):
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=value`` sets data['a']['b']; values are parsed as YAML scalars (3, 1e-4, true, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[leaf] = _load_yaml(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    data = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = _load_yaml(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    config = _build(RunConfig, apply_overrides(data, list(overrides)))
    config.validate()
    return config


SECRET = "<secret: not recorded>"


def publishable_dict(config: RunConfig) -> dict:
    """The config as a file a user may publish: a fixed ``privacy.noise_seed`` is left out."""
    data = dataclasses.asdict(config)
    if data["privacy"]["noise_seed"] is not None:
        data["privacy"]["noise_seed"] = SECRET
    return data
