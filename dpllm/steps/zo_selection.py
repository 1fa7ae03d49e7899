"""DP-ZOPO's data-free selection: which entries the zeroth-order step perturbs and updates.

Before training, on the model's absolute weights |theta| and a fixed input (one token, id 1),
with f the sum of the model's outputs:

    g1    = 1/q sum_k a_k z_k,  a_k = (f(|theta| + mu z_k) - f(|theta| - mu z_k)) / (2 mu)
    g2    = the same estimate at |theta| + mu g1, with q new directions
    score = |theta| * (g2 - g1) / mu     (a zeroth-order Hessian-gradient product, times the weight)

and the ``fraction`` of entries with the smallest |score| over all trainable parameters is
selected, as the authors' public code does. No training row is read, so the selection costs no
privacy and the guarantee of the step is unchanged. It runs in eval mode (no dropout, no draw
from the run's generators) and is deterministic given the model and the run's public seed; a
checkpoint keeps each rank's masks, as the step's ``rank_state``.

Memory: a copy of the trainable entries (fp32 at least) while it runs (the weights are restored
from it bit for bit; the score is formed in the parameters' own storage meanwhile, so in their dtype),
then one boolean per entry (the masks). Every z is regenerated from its keyed stream, as in the
step. Under FSDP2 and ZeRO-3 each rank scores its own shard (every rank runs the same forwards) and the
global threshold is found by bisection on the fp32 bit patterns, one all-reduce of a count per
bisection step, so the masks a rank keeps are those one process would select.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor, nn

from dpllm.distributed.env import DistEnv
from dpllm.steps.zeroth_order import Directions, fresh_forwards, local_views

FLOAT_BITS_INF = 0x7F800000  # the fp32 bits of +inf: non-negative floats order as their bits do


@torch.no_grad()
def select(
    model: nn.Module, params: dict[str, nn.Parameter], env: DistEnv, *, fraction: float, queries: int, mu: float, seed: int,
) -> dict[str, Tensor]:
    """Per parameter of ``params``, a boolean tensor over this rank's flattened entries (as
    ``local_views`` lays them out): True where the entry is selected."""
    if not 0 < fraction <= 1 or queries < 1 or not mu > 0:
        raise ValueError(f"need 0 < fraction <= 1, queries >= 1 and mu > 0 (got {fraction}, {queries}, {mu})")
    was_training = model.training
    model.eval()
    try:
        return _select(model, params, env, fraction, queries, mu, seed)
    finally:
        model.train(was_training)


def _select(model: nn.Module, params: dict, env: DistEnv, fraction: float, queries: int, mu: float, seed: int) -> dict:
    from torch.distributed.tensor import DTensor

    regather = fresh_forwards(model)

    def views():  # every change is followed by a forward: FSDP2's root (or ZeRO-3) must gather it again
        regather()
        return local_views(params, env)

    # FSDP2's shards and ZeRO-3's partitions add up over ranks; a replicated model is whole on each
    sharded = any(isinstance(p, DTensor) or hasattr(p, "ds_tensor") for p in params.values())
    over_ranks = env.sum_floats if sharded else list
    probe = torch.ones((1, 1), dtype=torch.long, device=next(iter(params.values())).device)

    def f() -> float:
        out = model(input_ids=probe)
        return float((out.logits if hasattr(out, "logits") else out[0]).double().sum())

    directions = Directions(seed)
    originals = [flat.to(torch.promote_types(flat.dtype, torch.float32), copy=True) for _, flat, _, _ in views()]
    for _, flat, _, _ in views():
        flat.abs_()
    first = _estimate(directions, 0, views, queries, mu, f)
    for k, a in enumerate(first):  # to |theta| + mu g1
        directions.add_(0, k, views(), mu * a / queries)
    second = _estimate(directions, 1, views, queries, mu, f)
    for _, flat, _, _ in views():  # the parameters' storage now holds the score
        flat.zero_()
    for round_, estimates in ((1, second), (0, [-a for a in first])):
        for k, a in enumerate(estimates):
            directions.add_(round_, k, views(), a / (queries * mu))
    magnitudes = [flat.mul_(original.abs()).abs_() for (_, flat, _, _), original in zip(views(), originals)]
    total = int(over_ranks([float(sum(m.numel() for m in magnitudes))])[0])
    threshold = _kth_smallest(magnitudes, max(1, int(fraction * total)), over_ranks)
    masks = {name: m <= threshold for (name, _, _, _), m in zip(views(), magnitudes)}
    for (_, flat, _, _), original in zip(views(), originals):
        flat.copy_(original)  # theta as it was, exactly
    regather()
    return masks


def _estimate(directions: Directions, round_: int, views, queries: int, mu: float, f) -> list[float]:
    """The q central-difference scalars of one round, each along its keyed direction."""
    out = []
    for k in range(queries):
        directions.add_(round_, k, views(), mu)
        plus = f()
        directions.add_(round_, k, views(), -2 * mu)
        minus = f()
        directions.add_(round_, k, views(), mu)
        out.append((plus - minus) / (2 * mu))
    return out


def _kth_smallest(magnitudes: list[Tensor], k: int, over_ranks) -> float:
    """The k-th smallest of the non-negative magnitudes (``over_ranks`` sums the counts over the
    ranks' shards): the smallest fp32 value t with at least k magnitudes at or below it, found by
    bisection on fp32 bit patterns, which order as the values do (NaNs are never selected)."""
    lo, hi = 0, FLOAT_BITS_INF
    while lo < hi:
        mid = (lo + hi) // 2
        t = _as_float(mid)
        count = over_ranks([float(sum(int((m <= t).sum()) for m in magnitudes))])[0]
        if count >= k:
            hi = mid
        else:
            lo = mid + 1
    return _as_float(lo)


def _as_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]
