"""The privacy report shipped with a model: ``final/privacy.json`` and a short ``final/PRIVACY.md``.

It says what the guarantee covers, so that a model card can quote it: epsilon and delta spent,
how they were computed (accountant, sampling, noise multiplier, sample rate, steps, clipping
norm), the unit protected, and the assumptions it rests on (a secret seed, no mismatched
resume).
"""

from __future__ import annotations

import json
from pathlib import Path


MECHANISMS = {
    "dp_sgd": "Poisson-subsampled Gaussian (DP-SGD)",
    "lmo": "Poisson-subsampled Laplace of random scale (LMO-DP; inverse scale {law})",
    "dp_zo": "Poisson-subsampled Gaussian, {k} per step (DP zeroth-order: one per direction, each on its own sample)",
}
ZO_CLIPPING = "per-sample directional derivative (l(theta + mu z) - l(theta - mu z)) / (2 mu), clamped to [-C, C]"


def privacy_report(
    config, plan, accountant, *, engine: str, world_size: int, duplicates: int, resume_mismatch: list[str]
) -> dict:
    p = config.privacy
    if not p.enabled:
        return {"private": False, "note": "trained without differential privacy (privacy.enabled=false)"}
    lmo = p.mechanism == "lmo"
    kind = "lmo" if lmo else config.algorithm
    clipping = ZO_CLIPPING if config.algorithm == "dp_zo" else f"per-sample {config.clip_norm.upper()} norm of the whole gradient"
    return {
        "private": True,
        "epsilon": accountant.epsilon(),
        "delta": plan.delta,
        "accountant": "RDP (Zhu & Wang's Poisson subsampling bound; dpllm.privacy.lmo)" if lmo else f"{p.accountant} (dp-accounting)",
        "mechanism": MECHANISMS[kind].format(k=config.mechanisms_per_step, law=config.lmo.law().to_dict() if lmo else None),
        "algorithm": config.algorithm,
        "adjacency": "add or remove one training row",
        "noise_multiplier": plan.noise_multiplier,
        "noise": "noise_multiplier * C * Laplace(0, 1/U) per coordinate, a fresh U for each" if lmo
        else "N(0, (noise_multiplier * C)^2) per coordinate",
        "sample_rate": plan.sample_rate,
        "steps": accountant.steps // config.mechanisms_per_step,
        "mechanisms_per_step": config.mechanisms_per_step,
        "history": accountant.state_dict()["history"],
        "max_grad_norm": p.max_grad_norm,
        "clipping": clipping,
        "unit": "one training row",
        "duplicate_rows": duplicates,
        "engine": engine,
        "world_size": world_size,
        "seed_secret": p.noise_seed is None,
        "resume_mismatch": resume_mismatch,
    }


def write_privacy_report(folder: Path, report: dict) -> None:
    (folder / "privacy.json").write_text(json.dumps(report, indent=2))
    (folder / "PRIVACY.md").write_text(_markdown(report))


def _markdown(r: dict) -> str:
    if not r["private"]:
        return "# Privacy\n\nThis model was trained **without** differential privacy.\n"
    lines = [
        "# Privacy",
        "",
        f"Trained with {'DP zeroth-order steps' if r['algorithm'] == 'dp_zo' else 'DP-SGD'} ({r['noise']}): ({r['epsilon']:.4g}, {r['delta']:.3g})-differential privacy for **{r['unit']}** "
        f"({r['adjacency']}), from the {r['accountant']} accountant of the {r['mechanism']} mechanism.",
        "",
        f"- {r['steps']} steps of {r['mechanisms_per_step']} mechanism(s), Poisson sampling at rate {r['sample_rate']:.4g}, noise multiplier "
        f"{r['noise_multiplier']:.4g}, per-sample clipping norm {r['max_grad_norm']:g}; engine {r['engine']} "
        f"on {r['world_size']} process(es).",
        f"- The training file held {r['duplicate_rows']} row(s) that exactly repeat an earlier row: data that "
        "appears in k rows is protected as a group of k (epsilon grows about k-fold).",
    ]
    if r["seed_secret"]:
        lines.append("- The noise and the sample were drawn from a secret seed (os.urandom) that no published file holds.")
    else:
        lines.append(
            "- **The run fixed privacy.noise_seed: this epsilon holds only while that number stays secret.** "
            "Anyone who knows it can replay the noise."
        )
    if r["resume_mismatch"]:
        lines.append(
            "- **Resumed from a checkpoint whose privacy history differs** (" + "; ".join(r["resume_mismatch"]) + "): "
            "epsilon covers the private steps recorded in the history above only."
        )
    return "\n".join(lines) + "\n"
