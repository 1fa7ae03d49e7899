"""Modules that let one sample's data reach another sample's loss, refused before training.

Clipping bounds what each sample's own gradient contributes; that bound means nothing if sample
j's data also moves sample i's loss (batch statistics, a mixture-of-experts capacity limit) or if
the model keeps data-dependent state outside its parameters (running statistics, saved
un-noised with the model). Two checks, both raising :class:`UnsupportedModuleError` naming the
module:

* :func:`refuse_sample_mixing`, by type, on every module, trainable or frozen: batch norm in all
  its forms (1d/2d/3d, lazy, ``SyncBatchNorm``) and instance norm that tracks running statistics.
* :func:`check_per_sample`, by behaviour, once before training: change the last sample of a batch,
  run the forward again from the same random state, and require every other sample's loss to be
  unchanged; otherwise name the first module (in completion order) whose output moved for an
  untouched sample while its inputs did not.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from dpllm.privacy.rules import UnsupportedModuleError


def refuse_sample_mixing(module: nn.Module, label: str) -> None:
    kind = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedModuleError(
            f"module '{label}' ({kind}) mixes samples of a batch in train mode and saves running statistics "
            "of the data without noise, trainable or not; replace it (e.g. GroupNorm/LayerNorm)"
        )
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        raise UnsupportedModuleError(
            f"module '{label}' ({kind}) tracks running statistics of the training data, which would be saved "
            "without noise; set track_running_stats=False"
        )


def check_per_sample(model: nn.Module, per_sample_loss: Callable[[nn.Module, dict], Tensor], batch: dict) -> None:
    """Raise if changing one sample of ``batch`` moves another sample's loss (train mode, same dropout)."""
    ids = batch["input_ids"]
    if ids.shape[0] < 2:
        return
    changed = dict(batch)
    real = batch.get("attention_mask", torch.ones_like(ids))[-1].bool()
    changed["input_ids"] = ids.clone()
    changed["input_ids"][-1, real] = (ids[-1, real] + 1) % model.get_input_embeddings().num_embeddings
    loss_a, calls_a = _trace(model, per_sample_loss, batch)
    loss_b, verdicts = _trace(model, per_sample_loss, changed, against=calls_a)
    if _same(loss_a[:-1], loss_b[:-1]):
        return
    culprit = next((name for name, inputs_same, output_same in verdicts if inputs_same and not output_same), None)
    where = f"module '{culprit}' ({type(model.get_submodule(culprit)).__name__})" if culprit else "a part of the model"
    raise UnsupportedModuleError(
        f"{where} mixes samples: changing one sample of a batch changed the loss of the others, so a per-sample "
        "gradient bound does not bound one sample's influence; replace it or run it in a per-sample form"
    )


def _trace(model: nn.Module, per_sample_loss, batch: dict, against: list | None = None) -> tuple[Tensor, list]:
    """Per-sample losses, and each module call's batch-first inputs and output minus the last
    sample; or, ``against`` a first trace, whether each call's inputs and output are the same as
    there (each recorded call dropped as it is compared, so the two traces are never both held)."""
    size = batch["input_ids"].shape[0]
    calls = []

    def rows(values) -> list[Tensor]:
        return [v[:-1].detach().clone() for v in values if isinstance(v, Tensor) and v.dim() and v.shape[0] == size]

    def record(name):
        def hook(module, args, kwargs, output):
            outputs = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else [output]
            ins, out = rows([*args, *kwargs.values()]), rows(outputs)[:1]
            if against is None:
                calls.append((name, ins, out))
                return
            k = len(calls)
            first = against[k] if k < len(against) else None
            if first is None:  # a call the first pass did not make
                calls.append((name, False, True))
                return
            against[k] = None
            calls.append((name, all(_same(a, b) for a, b in zip(first[1], ins)), _same(first[2], out)))

        return hook

    handles = [m.register_forward_hook(record(n), with_kwargs=True) for n, m in model.named_modules() if n]
    was_training = model.training
    device = batch["input_ids"].device
    try:
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)  # the same dropout masks for both batches
            loss = per_sample_loss(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return loss, calls


def _same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    tol = 16 * torch.finfo(a.dtype).eps
    return bool(torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))
