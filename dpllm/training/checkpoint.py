"""Atomic checkpoints a run resumes from exactly.

A checkpoint is a folder ``checkpoints/step_{N}`` holding everything the next step depends on:

    model/          the parameters in Hugging Face form (rank 0 writes it; FSDP2 gathers them first)
    sharded/        model and optimizer state in torch.distributed.checkpoint form (one process,
                    torchrun ddp and FSDP2: each rank writes its own shards)
    optim_rank{r}.pt  DeepSpeed's ZeRO optimizer partition of rank r (fp32 master weights included)
    partition_rank{r}.pt  rank r's ZeRO-3 weight partitions, for dp_zo (no optimizer holds them)
    rng_rank{r}.pt  rank r's torch generator states (CPU and CUDA), which draw dropout masks
    step_rank{r}.pt what the step kind keeps per rank in tensors, where it keeps any (DP-ZOPO's
                    selection of the entries rank r moves, DP-ZOSO's stage starting point)
    state.json      step, the run's privacy context (private or not, dataset size and
                    fingerprint, delta, accountant), accountant history, sampler generator
                    state, noise seed (not in secure mode: a resumed secure run draws fresh
                    seeds), metrics rows so far (diagnostics included)

A checkpoint is as secret as the training data: its seeds replay the run's noise and sample, and
its rows hold non-private statistics. Publish ``final/`` (and the publishable logs), never
``checkpoints/``.

Every rank writes into ``step_{N}.partial``; once all have written (a barrier), rank 0 renames it to ``step_{N}``
(a rename is atomic) and then rewrites ``latest`` by rename too. A run killed at any moment
leaves either the previous complete checkpoint or the new one, never a half-written one that
``resume`` would pick.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpllm.distributed.saving import save_streaming
from dpllm.distributed.zero3 import load_partitions, partitions

PARTIAL = ".partial"


@dataclass(frozen=True)
class PrivacyContext:
    """What a run's privacy history means; a resume into a run with another context would
    report an epsilon that does not describe what the released model has spent."""

    private: bool
    num_train_examples: int
    delta: float
    accountant: str
    train_data_sha256: str

    def differences(self, saved: dict | None) -> list[str]:
        if saved is None:
            return ["the checkpoint records no privacy context"]
        return [
            f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
            for key, value in asdict(self).items()
            if saved.get(key) != value
        ]


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step}"


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run's output_dir (its latest checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        found = path / "checkpoints" / latest.read_text().strip()
        if (found / "state.json").is_file():
            return found
    raise FileNotFoundError(f"{path}: neither a checkpoint (no state.json) nor a run folder with checkpoints/latest")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    tmp.write_text(text)
    os.replace(tmp, path)


def _tensor_to_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _text_to_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def save(
    output_dir, step: int, *, env, engine: str, model, tokenizer, optimizer, accountant, sampler, noise, rows,
    privacy: PrivacyContext, partitioned: bool = False, step_state: dict | None = None, rank_state: dict | None = None,
) -> Path:
    """``partitioned``: the parameters are FSDP2 shards or ZeRO-3 partitions (the Hugging Face
    folder is then streamed from them, every rank taking part)."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + PARTIAL)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    if partitioned:
        save_streaming(model, tmp / "model", env)
    torch.save(_generator_states(), tmp / f"rng_rank{env.rank}.pt")
    if rank_state:
        torch.save(rank_state, tmp / f"step_rank{env.rank}.pt")
    if engine == "deepspeed" and optimizer is None:  # dp_zo under ZeRO-3: the partitions are the state
        torch.save(partitions(model), tmp / f"partition_rank{env.rank}.pt")
    elif engine == "deepspeed":
        torch.save(optimizer.state_dict(), tmp / f"optim_rank{env.rank}.pt")
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer or ())
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "sharded", no_dist=not env.distributed)
    env.barrier()  # every rank's files are in before rank 0 declares the folder complete
    if env.is_main:
        if not partitioned:
            model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        state = {
            "step": step,
            "world_size": env.world_size,
            "engine": engine,
            "privacy": asdict(privacy),
            "accountant": accountant.state_dict() if privacy.private else None,
            "sampler": None if sampler.secure else _tensor_to_text(sampler.state_dict()["generator"]),
            "noise": None if noise is None or noise.secure else noise.state_dict(),
            "step_state": step_state or {},  # what the step kind keeps of its own (zeroth-order: its direction seed)
            "rows": rows,
        }
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_text_atomic(final.parent / "latest", final.name)
    env.barrier()
    return final


def load(
    path: Path, *, env, engine: str, model, optimizer, accountant, sampler, noise, privacy: PrivacyContext,
    accept_mismatch: bool = False, partitioned: bool = False,
) -> dict:
    """Restore the states saved by :func:`save` into freshly built objects; returns state.json,
    with ``privacy_mismatch`` listing how its privacy context differs from ``privacy`` (refused
    unless ``accept_mismatch``) and ``rank_state``, this rank's step tensors ({} if none)."""
    state = json.loads((path / "state.json").read_text())
    if state["engine"] != engine or state["world_size"] != env.world_size:
        raise ValueError(
            f"{path} was written by engine {state['engine']} on {state['world_size']} processes; "
            f"resume it with the same (this run: {engine} on {env.world_size})"
        )
    state["privacy_mismatch"] = mismatch = privacy.differences(state.get("privacy"))
    if mismatch and not accept_mismatch:
        raise ValueError(
            f"{path} is a checkpoint of a run with another privacy history ({'; '.join(mismatch)}): the epsilon "
            "reported after resuming would not describe the model. Resume a checkpoint of this run, or set "
            "privacy.accept_resume_mismatch=true to go on anyway (the summary and final/privacy.json record it)"
        )
    if engine == "deepspeed" and optimizer is None:
        load_partitions(model, torch.load(path / f"partition_rank{env.rank}.pt"))
    elif engine == "deepspeed":
        if not partitioned:  # ZeRO-1/2 restore their fp32 master partitions, not the module's parameters
            _load_module_weights(model, path / "model")
        # ZeRO-1/2 may re-partition, so they read every rank's file; ZeRO-3 reads its own
        optimizer_partitions = [
            torch.load(path / f"optim_rank{r}.pt", weights_only=False) if r == env.rank or not partitioned else None
            for r in range(env.world_size)
        ]
        optimizer.load_state_dict(optimizer_partitions, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer or ())
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=path / "sharded", no_dist=not env.distributed)
        set_state_dict(model, optimizer or (), model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    _set_generator_states(torch.load(path / f"rng_rank{env.rank}.pt"))
    step_file = path / f"step_rank{env.rank}.pt"
    state["rank_state"] = torch.load(step_file) if step_file.is_file() else {}
    if privacy.private and state["accountant"] is not None:
        # the history is the mechanism's; an accepted mismatch composes it at this run's delta
        accountant.load_state_dict({**state["accountant"], "delta": accountant.delta, "accountant": accountant.accountant})
    if state["sampler"] is not None and not sampler.secure:
        sampler.load_state_dict({"generator": _text_to_tensor(state["sampler"])})
    if noise is not None and state["noise"] is not None and not noise.secure:
        noise.load_state_dict(state["noise"])
    return state


def _load_module_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    missing = set(dict(model.named_parameters())) - set(weights)
    missing -= {n for n in missing if n.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    if missing:
        raise ValueError(f"{folder} lacks parameters {sorted(missing)[:5]}")
    model.load_state_dict(weights, strict=False)


def _generator_states() -> dict:
    """Torch's default generators: they draw dropout masks, which a resumed run must repeat."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_generator_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
