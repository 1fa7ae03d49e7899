"""The training loop: Poisson-sampled logical batches, micro-batched, through the private step."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpllm.config import RunConfig, publishable_dict
from dpllm.distributed import init_distributed
from dpllm.distributed.fsdp import shard_from_rank0
from dpllm.distributed.saving import save_streaming
from dpllm.distributed.zero3 import partition_from_rank0
from dpllm.lm import IGNORE_INDEX
from dpllm.models import load_model_and_tokenizer, pad_token_id
from dpllm.privacy.clipper import PerSampleClipper
from dpllm.privacy.mechanisms import GaussianMechanism, LMOMechanism
from dpllm.privacy.mixing import check_per_sample
from dpllm.privacy.sampling import PoissonSampler, micro_batches, rank_share
from dpllm.privacy.seeds import derive, secret_seed
from dpllm.steps import MicroBatch, NonPrivateStep, PrivateStep, ShardedPrivateStep, StageSchedule, ZerothOrderStep, zo_selection
from dpllm.tasks import get_task
from dpllm.training import checkpoint
from dpllm.training.evaluation import GenerationEval, write_results
from dpllm.training.objectives import Objective, objective_for
from dpllm.training.metrics import MetricsLog
from dpllm.training.privacy_report import privacy_report, write_privacy_report

log = logging.getLogger("dpllm")


@dataclass
class PrivacyPlan:
    sample_rate: float
    steps: int
    delta: float
    noise_multiplier: float
    planned_epsilon: float


def mechanism_of(config: RunConfig) -> GaussianMechanism | LMOMechanism:
    """The noise mechanism ``privacy.mechanism`` names: its math, accountant and sampler."""
    if config.privacy.mechanism == "lmo":
        return LMOMechanism(config.lmo.law())
    return GaussianMechanism(config.privacy.accountant)


def plan_privacy(config: RunConfig, num_examples: int) -> PrivacyPlan:
    """Sample rate, steps and noise multiplier for the run; errors if the target budget cannot be
    met. A step composes ``config.mechanisms_per_step`` Poisson-subsampled mechanisms
    (zeroth-order directions)."""
    if config.batch_size > num_examples:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {num_examples} training examples")
    q = config.batch_size / num_examples
    steps = config.max_steps if config.max_steps is not None else math.ceil(config.epochs / q)
    p = config.privacy
    delta = p.delta if p.delta is not None else 1.0 / (2 * num_examples)
    if not p.enabled:
        return PrivacyPlan(q, steps, delta, 0.0, math.inf)
    if delta >= 1.0 / num_examples:
        log.warning("privacy.delta=%g is not below 1/N=%g: such a guarantee allows releasing a whole example", delta, 1 / num_examples)
    per_step = config.mechanisms_per_step
    mechanism = mechanism_of(config)
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = mechanism.calibrate(p.target_epsilon, delta, q, steps * per_step)
    eps = mechanism.epsilon(sigma, q, steps * per_step, delta)
    if p.target_epsilon is not None and eps > p.target_epsilon:
        fits = mechanism.max_steps_within(sigma, q, delta, p.target_epsilon, limit=steps * per_step) // per_step
        raise ValueError(
            f"the plan ({steps} steps of {per_step} mechanism(s) at noise multiplier {sigma:g}, sample rate {q:g}) spends "
            f"epsilon {eps:.4g} > privacy.target_epsilon={p.target_epsilon:g}; at most {fits} steps fit: lower "
            "max_steps/epochs, raise privacy.noise_multiplier, or leave it out to calibrate it"
        )
    return PrivacyPlan(q, steps, delta, sigma, eps)


def load_task_data(config: RunConfig, tokenizer, objective: Objective):
    """Eval rows (for generation), encoded train and eval examples, and counts of truncated and
    duplicated rows (statistics of the training data: diagnostics, not for publication)."""
    d = config.data
    train_rows = objective.load(d.train_file, d.train_split, d.max_train_examples)
    eval_rows = objective.load(d.eval_file, d.eval_split, d.max_eval_examples) if d.eval_file else []
    counts = {
        "truncated_train": 0,
        "truncated_eval": 0,
        "duplicate_train_rows": len(train_rows) - len({repr(row) for row in train_rows}),
    }

    def encode(rows, key):
        out = []
        for row in rows:
            example, truncated = objective.encode(row, tokenizer, d.max_length)
            counts[key] += truncated
            out.append(example)
        return out

    return eval_rows, encode(train_rows, "truncated_train"), encode(eval_rows, "truncated_eval"), counts


def _trainable(model) -> list:
    return [q for q in model.parameters() if q.requires_grad]


def _optimizer(config: RunConfig, params):
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def train(config: RunConfig) -> dict:
    """Fine-tune as ``config`` says; returns the run summary (summary.json holds its publishable part)."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # initialisation and dropout; the sample and the noise use the secret root
    env = init_distributed(config.engine)
    if config.engine == "single" and env.distributed:
        raise ValueError(f"{env.world_size} processes were launched but engine is 'single'; pick ddp or deepspeed")
    device = env.device()
    if config.run_precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision=bf16-mixed: this GPU has no bf16 support; use precision=fp32")
    if config.run_precision != config.precision:
        log.warning("precision=%s: DeepSpeed's config %s decides, and it trains in %s", config.precision,
                    config.deepspeed_config, config.run_precision)
    objective = objective_for(config.data.task)
    partitioned = config.partitions_parameters  # FSDP2 or ZeRO-3: forwards and saving need every rank
    # Partitioned engines: rank 0 loads (into memory it can free layer by layer as it shards), the
    # others build on the meta device, then each keeps its part
    weights = "mapped" if not partitioned else "owned" if env.is_main else "meta"
    model, tokenizer = load_model_and_tokenizer(config.model, num_labels=objective.num_labels, weights=weights)
    if not partitioned:
        model.to(device)
    model.train()
    pad_id = pad_token_id(tokenizer)
    eval_rows, train_data, eval_data, data_counts = load_task_data(config, tokenizer, objective)
    gen = config.generation
    evaluates = env.is_main or partitioned  # every rank steps a partitioned model's forward, in lockstep
    scorer = None
    if eval_rows and evaluates and objective.num_labels is None:
        scorer = GenerationEval(get_task(config.data.task), eval_rows, gen, out, write=env.is_main, synced=partitioned and env.distributed)
    if not any(_has_target(row) for row in train_data):
        raise ValueError(
            f"no training row keeps a target token within data.max_length={config.data.max_length}: "
            "every loss would be 0; raise data.max_length"
        )
    plan = plan_privacy(config, len(train_data))
    p = config.privacy
    # Built once the parameters are in place (FSDP2: on the shards); DeepSpeed wraps it after the step's hooks are on
    zeroth_order = config.algorithm == "dp_zo"  # no backward: no optimizer, no clipper
    optimizer = None if partitioned or zeroth_order else _optimizer(config, _trainable(model))
    expected_batch = plan.sample_rate * len(train_data)
    mechanism = mechanism_of(config)
    accountant = mechanism.accountant(plan.delta)
    # The root of the sample and the noise: rank 0's, secret unless the user fixed it.
    root = env.broadcast_int(p.noise_seed if p.noise_seed is not None else secret_seed())
    if p.enabled and env.is_main:  # on the whole model (rank 0's, before sharding)
        rows = _probe_rows(train_data)
        probe = objective.collate(rows, pad_id)
        # the forward that training runs; without gradients, so autocast keeps no bf16 copy of the weights
        with torch.no_grad(), _autocast(config, device):
            check_per_sample(model, objective.per_sample_loss, {k: v.to(next(model.parameters()).device) for k, v in probe.items()})
        if config.engine != "single" and not zeroth_order:  # before any engine wraps (or partitions) the model
            # in fp32 whatever the precision: which parameters the hooks see does not depend on it, and
            # a bf16 backward would hold a bf16 copy of the whole model on rank 0 besides its own
            _check_clipping(model, objective, rows, pad_id, p.max_grad_norm, config.clip_norm)
    if p.enabled and p.noise_seed is not None:
        log.warning(
            "privacy.noise_seed is set: the reported epsilon assumes that number stays secret "
            "(whoever knows it can replay the noise); it is not written to any published file"
        )
    stepper = _build_step(config, env, model, optimizer, device, plan, mechanism, accountant, root, expected_batch)
    sampler = PoissonSampler(len(train_data), plan.sample_rate, seed=derive(root, "sampler"), secure=p.secure_mode)
    metrics = MetricsLog(out, enabled=env.is_main, diagnostics=p.diagnostics_log)
    if env.is_main:
        (out / "config.json").write_text(json.dumps(publishable_dict(config), indent=2))
    header = {
        "step": 0,
        "num_train_examples": len(train_data),
        "sample_rate": plan.sample_rate,
        "planned_steps": plan.steps,
        "noise_multiplier": plan.noise_multiplier,
        "delta": plan.delta,
        "planned_epsilon": plan.planned_epsilon if p.enabled else None,
        **data_counts,
    }
    noise = stepper.noise if p.enabled else None
    privacy_context = checkpoint.PrivacyContext(
        private=p.enabled, num_train_examples=len(train_data), delta=plan.delta, accountant=mechanism.accountant_name,
        train_data_sha256=_fingerprint(train_data),
    )

    def save_checkpoint(step: int):
        return checkpoint.save(
            out, step, env=env, engine=config.engine, model=model, tokenizer=tokenizer, optimizer=stepper.optimizer,
            accountant=accountant, sampler=sampler, noise=noise, rows=metrics.rows, privacy=privacy_context,
            partitioned=partitioned, step_state=stepper.state_dict(), rank_state=stepper.rank_state(),
        )

    start, resume_mismatch = 0, []
    if config.resume:
        path = checkpoint.resolve(config.resume)
        state = checkpoint.load(
            path, env=env, engine=config.engine, model=model, optimizer=stepper.optimizer,
            accountant=accountant, sampler=sampler, noise=noise, privacy=privacy_context, accept_mismatch=p.accept_resume_mismatch,
            partitioned=partitioned,
        )
        start = stepper.step_index = state["step"]
        stepper.load_state_dict(state.get("step_state", {}))
        stepper.load_rank_state(state["rank_state"])
        resume_mismatch = state["privacy_mismatch"]
        for row in state["rows"]:
            metrics.log(row)
        header = state["rows"][0]
        log.info("resumed from %s at step %d (epsilon spent so far %.4g)", path, start, accountant.epsilon() if p.enabled else 0)
    else:
        if eval_data and evaluates:
            header.update(objective.evaluate(model, eval_data, pad_id, config.eval_batch_size))
        metrics.log(header)
        log.info("plan: %s", header)
    end = plan.steps
    if p.enabled and p.target_epsilon is not None:  # the budget guard
        per_step = config.mechanisms_per_step
        end = start + accountant.steps_within(
            plan.noise_multiplier, plan.sample_rate, p.target_epsilon, (plan.steps - start) * per_step
        ) // per_step
        if end < plan.steps:
            log.warning(
                "privacy budget: only %d of the planned %d steps keep epsilon within %g; the run stops after step %d",
                end, plan.steps, p.target_epsilon, end,
            )

    def forward(batch: dict) -> torch.Tensor:
        with _autocast(config, device):
            return objective.per_sample_loss(model, batch)

    def micro_batches_of(indices: list[int]) -> list[MicroBatch]:
        # Micro-batches of similar lengths waste little compute on padding; the clipped sum does not
        # depend on how a sample is cut.
        mine = sorted(rank_share(indices, env.rank, env.world_size), key=lambda i: len(train_data[i]["input_ids"]))
        micros = micro_batches(mine, config.micro_batch_size)
        # Clipped sums go to their owners per micro-batch (and FSDP2 and ZeRO-3 gather parameters in
        # every forward and backward), so ranks run as many micro-batches as the busiest one (Poisson
        # shares differ; one may be empty), the extra ones adding nothing.
        rounds = env.max_int(len(micros))
        out = []
        for k in range(rounds):
            examples = train_data[:1] if k >= len(micros) else [train_data[i] for i in micros[k]]
            batch = {key: v.to(device) for key, v in objective.collate(examples, pad_id).items()}
            out.append(MicroBatch(batch, padding=k >= len(micros)))
        return out

    desc = "private fine-tune" if p.enabled else "fine-tune"
    bar = tqdm(range(start, end), desc=desc, initial=start, total=end, disable=not (config.progress and env.is_main))
    started = time.perf_counter()
    for step in bar:
        draws = [sampler.sample() for _ in range(stepper.samples_per_step)]  # one per zeroth-order direction
        losses = stepper.run([micro_batches_of(indices) for indices in draws], forward)
        stats = stepper.step()
        done = step + 1
        if done % config.log_every == 0 or done == end:
            all_losses = torch.cat([loss.cpu() for loss in losses]) if losses else torch.zeros(0)
            finite = all_losses[torch.isfinite(all_losses)]
            loss_sum, loss_count = env.sum_floats([float(finite.sum()), finite.numel()])
            row = {
                "step": done,
                "loss": loss_sum / loss_count if loss_count else None,
                "epsilon": accountant.epsilon() if p.enabled else None,
                "batch_size": sum(len(indices) for indices in draws),
                "elapsed_s": round(time.perf_counter() - started, 3),
                **stats,
            }
            if config.eval_every and done % config.eval_every == 0 and eval_data and evaluates:
                row.update(objective.evaluate(model, eval_data, pad_id, config.eval_batch_size))
            if scorer and gen.every and done % gen.every == 0:
                row["scores"] = scorer(model, tokenizer, done)
            metrics.log(row)
            bar.set_postfix(eps=row["epsilon"])
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            save_checkpoint(done)
    bar.close()
    if end < plan.steps:
        metrics.log({"step": end, "stopped": "privacy budget", "epsilon": accountant.epsilon()})
        if not (config.checkpoint_every and end % config.checkpoint_every == 0):
            log.warning("stopped at step %d to stay within epsilon %g; checkpoint in %s", end, p.target_epsilon, save_checkpoint(end))

    report = privacy_report(
        config, plan, accountant, engine=config.engine, world_size=env.world_size,
        duplicates=data_counts["duplicate_train_rows"], resume_mismatch=resume_mismatch,
    )
    summary = {
        "algorithm": config.algorithm,
        "steps": end,
        "planned_steps": plan.steps,
        "epsilon": accountant.epsilon() if p.enabled else None,
        "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "accountant": mechanism.accountant_name,
        "mechanism": p.mechanism,
        "clipping": config.clipping_mode if p.enabled else None,
        "clip_norm": config.clip_norm if p.enabled else None,
        "precision": config.run_precision,
        "world_size": env.world_size,
        "seed_secret": p.noise_seed is None,
        "resume_mismatch": resume_mismatch,
    }
    if p.enabled and p.noise_seed is not None:
        summary["seed_note"] = "privacy.noise_seed was fixed: epsilon holds only while that number stays secret"
    diagnostics = {"train_seconds": round(time.perf_counter() - started, 1)}
    finished = _finish(config, env, objective, model, tokenizer, metrics, header, eval_data, pad_id, scorer, end) if evaluates else {}
    if env.is_main:
        summary.update(finished)
        write_privacy_report(out / "final", report)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if p.diagnostics_log:
            (out / "diagnostics" / "summary.json").write_text(json.dumps(diagnostics, indent=2))
        if summary["scores"] is not None:
            write_results(out / "results.json", summary["scores"], task=config.data.task, step=end, epsilon=summary["epsilon"])
    env.barrier()
    return {**summary, **diagnostics}


def _fingerprint(examples: list[dict]) -> str:
    """Identifies the encoded training set, so a checkpoint of a run on other data is recognised."""
    return hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()


def _finish(config, env, objective, model, tokenizer, metrics, header, eval_data, pad_id, scorer, steps: int) -> dict:
    """Final evaluation and scores (reusing the last step's when it just ran them), model, plots.
    Under FSDP2 and ZeRO-3 every rank runs it (the forward and the streamed save are collective)."""
    out = Path(config.output_dir)
    last = metrics.rows[-1]
    final = {k: v for k, v in last.items() if k.startswith("eval_")} if last["step"] == steps else {}
    if not final and eval_data:
        final = objective.evaluate(model, eval_data, pad_id, config.eval_batch_size)
        metrics.log({"step": steps, **final})
    final_scores = last.get("scores") if last["step"] == steps else None
    if final_scores is None and scorer and config.generation.at_end:
        final_scores = scorer(model, tokenizer, steps, progress=config.progress)
        metrics.log({"step": steps, "scores": final_scores})
    if config.partitions_parameters:
        save_streaming(model, out / "final", env)
    else:
        if hasattr(model, "merge_and_unload"):  # LoRA: the adapters alone, then the merged model
            model.save_pretrained(out / "final" / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(out / "final")
    if not env.is_main:
        return {}
    tokenizer.save_pretrained(out / "final")
    metrics.plot(out / "training.png")
    metrics.plot_denoising(out / "denoising.png")
    if config.privacy.diagnostics_log:
        metrics.plot(out / "diagnostics" / "training.png", public=False)
        metrics.plot_denoising(out / "diagnostics" / "denoising.png", public=False)
    if final_scores is not None:
        metrics.plot_scores(out / "scores.png")
    before = {f"{k}_before": v for k, v in header.items() if k.startswith("eval_")}
    after = {f"{k}_after": v for k, v in final.items()}
    return {"eval_loss_before": None, "eval_loss_after": None, **before, **after, "scores": final_scores}


PROBE_TOKENS = 64


def _has_target(row: dict) -> bool:
    """Whether an encoded row has a loss: a class label, or a target token left after truncation."""
    labels = row.get("labels")
    return not isinstance(labels, list) or any(label != IGNORE_INDEX for label in labels)


def _probe_rows(rows: list[dict], max_tokens: int = PROBE_TOKENS) -> list[dict]:
    """The rows the startup checks run on. Any two rows with a loss check the rules, and the
    mixing probe keeps every module's activations: the two shortest rows with a target token
    (a row truncated before its target has loss 0 and would pass every check unexamined), each
    cut to its first ``max_tokens`` tokens (further, where needed, to keep a target token)."""
    shortest = sorted(rows, key=lambda r: (not _has_target(r), len(r["input_ids"])))[:2]
    out = []
    for row in shortest:
        n, keep = len(row["input_ids"]), max_tokens
        labels = row.get("labels")
        if isinstance(labels, list) and len(labels) == n:  # token labels: keep up to the first target and one more
            first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), n)
            keep = max(keep, first + 2)
        out.append({k: v[:keep] if isinstance(v, list) and len(v) == n else v for k, v in row.items()})
    return out


def _autocast(config: RunConfig, device: torch.device):
    """bf16-mixed: forwards in bf16 autocast (their backwards follow); weights, optimizer state,
    norms and clipped sums stay fp32. FSDP2 also gathers its units in bf16 (distributed/fsdp.py);
    autocast still runs there, keeping the ops it lists as fp32 (softmax, the loss) in fp32.
    DeepSpeed's bf16 runs bf16 weights itself: no autocast."""
    if config.precision != "bf16-mixed" or config.engine == "deepspeed":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _check_clipping(model, objective: Objective, examples: list[dict], pad_id: int, max_grad_norm: float, norm: str) -> None:
    """One clipped backward with the clipper's check against autograd, then nothing kept (the
    clipped sums are dropped as formed, the check holds one parameter's gradient at a time).
    Any two rows check the rules; the caller gives short ones (see _probe_rows)."""
    clipper = PerSampleClipper(
        model, max_grad_norm=max_grad_norm, norm=norm, verify_first_backward=True, grad_sink=lambda name, sum_: None
    )
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in objective.collate(examples, pad_id).items()}
    loss = objective.per_sample_loss(model, batch)
    clipper.backward(loss)
    clipper.detach()
    model.zero_grad(set_to_none=True)
    if clipper.last_dropped:  # the check is skipped for a batch with a non-finite sample
        raise ValueError("the clipper's startup check could not run: a probe row's loss or gradient is not finite")


def _build_step(config: RunConfig, env, model, optimizer, device, plan: PrivacyPlan, mechanism, accountant, root: int, expected_batch: float):
    """The step the config asks for: DP-SGD (one process or sharded), DP zeroth-order, or the
    non-private baseline; partitioning engines shard the model here."""
    p = config.privacy
    if not p.enabled:  # engine single (config validation)
        return NonPrivateStep(model, optimizer, expected_batch_size=expected_batch)
    noise = mechanism.noise(plan.noise_multiplier, p.max_grad_norm, seed=derive(root, "noise"), secure=p.secure_mode)
    common = dict(
        max_grad_norm=p.max_grad_norm,
        noise=noise,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        expected_batch_size=expected_batch,
        accountant=accountant,
    )
    if config.algorithm == "dp_zo":
        if config.engine == "fsdp":
            shard_from_rank0(model, env, device, bf16_gather=config.precision == "bf16-mixed")
        elif config.engine == "deepspeed":  # ZeRO-3 (config validation): its forward hooks, no optimizer
            import deepspeed

            ds = _deepspeed_config(config)
            partition_from_rank0(model, ds, env)
            deepspeed.initialize(model=model, config=ds)
        zo = config.zo
        schedule = StageSchedule(
            lr=zo.lr, mu=zo.mu, stages=zo.stages, first_steps=zo.stage_steps, mu_end=zo.mu_end, regularization=zo.regularization
        )
        log.info("DP zeroth-order: %d direction(s) per step, %s", zo.directions, schedule)
        masks = None
        if zo.select_fraction < 1 and not config.resume:  # data-free, on the base weights; a resume loads its own
            trainable = {n: q for n, q in model.named_parameters() if q.requires_grad}
            masks = zo_selection.select(
                model, trainable, env, fraction=zo.select_fraction, queries=zo.select_queries, mu=zo.mu,
                seed=derive(config.seed, "selection"),
            )
            kept = sum(int(m.sum()) for m in masks.values())
            log.info("DP-ZOPO selection: %d of this rank's %d trainable entries", kept, sum(m.numel() for m in masks.values()))
        # The directions carry no privacy (see steps/zeroth_order.py): from the public seed
        return ZerothOrderStep(
            model, env=env, directions=zo.directions, schedule=schedule, direction_seed=derive(config.seed, "directions"),
            lockstep=config.partitions_parameters, masks=masks, selects=zo.select_fraction < 1, **common,
        )
    common.update(
        denoiser_options=config.denoise.options() if config.denoise.enabled else None,
        denoise_every=config.denoise.every,
        denoise_start=config.denoise.start,
        diagnostics=config.denoise.diagnostics,
        clipper_options={"mode": config.clipping_mode, "norm": config.clip_norm},
    )
    log.info("per-sample clipping: %s, %s norm (privacy.clipping=%s); noise: %s", config.clipping_mode, config.clip_norm,
             p.clipping, p.mechanism)
    if config.denoise.diagnostics:
        log.warning(
            "denoise.diagnostics is on: diagnostics/metrics.jsonl will hold cosines to the clipped, pre-noise "
            "gradient. These numbers are NOT differentially private; never publish them or use them to tune a private run."
        )
    if config.engine == "single":
        return PrivateStep(model, optimizer, **common)
    return _sharded_step(config, env, model, optimizer, device, common)


def _sharded_step(config: RunConfig, env, model, optimizer, device, common: dict) -> ShardedPrivateStep:
    """The multi-process step, its hooks put on the modules before FSDP2 swaps their parameters
    for shards or ZeRO-3 partitions them; then the engine's optimizer over what each rank holds."""
    handover = {"ddp": "replicated", "fsdp": "fsdp", "deepspeed": "zero3" if config.zero_stage == 3 else "deepspeed"}
    stepper = ShardedPrivateStep(model, optimizer, env=env, handover=handover[config.engine], **common)
    if config.engine == "fsdp":
        stepper.release_parameters()
        shard_from_rank0(model, env, device, bf16_gather=config.precision == "bf16-mixed")
        stepper.use_sharded(model, _optimizer(config, _trainable(model)))
    elif config.engine == "deepspeed":
        if config.zero_stage == 3:
            partition_from_rank0(model, _deepspeed_config(config), env)
            optimizer = _optimizer(config, _trainable(model))
        stepper.use_sharded(model, _deepspeed_optimizer(config, model, optimizer))
    return stepper


def _deepspeed_config(config: RunConfig) -> dict:
    """The DeepSpeed config file, with the batch settings the private step implies. dp_zo changes
    the weights in place between forwards: no partition stays gathered after its module's forward
    (none persistent, none kept for reuse), so each forward gathers what the step last wrote."""
    with open(config.deepspeed_config, encoding="utf-8") as f:
        ds = json.load(f)  # ZeRO stage 1, 2 or 3: checked with the config
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    zero = ds.setdefault("zero_optimization", {})
    zero["overlap_comm"] = False
    if config.algorithm == "dp_zo":
        zero.update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    return ds


def _deepspeed_optimizer(config: RunConfig, model, optimizer):
    """Wrap the optimizer in DeepSpeed's ZeRO optimizer; the private step drives it directly."""
    import deepspeed

    _, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=_deepspeed_config(config))
    return ds_optimizer
