"""DP-ZOPO's data-free selection: the definition recomputed densely, only the selected entries
move, and FSDP2's shards select what one process selects."""

import pytest
import torch
from torch.func import functional_call

from dpllm.distributed.env import DistEnv
from dpllm.distributed.fsdp import shard_from_rank0
from dpllm.distributed.local import run_on_ranks
from dpllm.steps import MicroBatch, zo_selection
from dpllm.steps.zeroth_order import Directions
from tests.conftest import tiny_batch, tiny_model
from tests.steps.test_zeroth_order import forward_of, make_step

FRACTION, QUERIES, MU, SEED = 0.3, 3, 1e-3, 23


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference_masks(model, fraction: float, queries: int, mu: float, seed: int) -> tuple[dict, dict, float]:
    """The selection from its definition, with every direction and estimate held densely."""
    names = list(_trainable(model))
    base = {n: p.detach().abs() for n, p in model.named_parameters()}
    probe = torch.ones((1, 1), dtype=torch.long)

    def f(theta: dict) -> float:
        return float(functional_call(model, theta, args=(), kwargs={"input_ids": probe}).logits.double().sum())

    def z(round_: int, k: int) -> dict:
        out = {n: torch.zeros_like(base[n]) for n in names}
        Directions(seed).add_(round_, k, [(n, t.view(-1), 0, t.numel()) for n, t in out.items()], 1.0)
        return out

    def move(theta: dict, direction: dict, alpha: float) -> dict:
        return {n: t + alpha * direction[n] if n in direction else t for n, t in theta.items()}

    def estimates(theta: dict, round_: int) -> list[float]:
        return [(f(move(theta, z(round_, k), mu)) - f(move(theta, z(round_, k), -mu))) / (2 * mu) for k in range(queries)]

    a = estimates(base, 0)
    shifted = base
    for k, ak in enumerate(a):
        shifted = move(shifted, z(0, k), mu * ak / queries)
    b = estimates(shifted, 1)
    scores = {}
    for n in names:
        hg = sum(bk * z(1, k)[n] for k, bk in enumerate(b)) - sum(ak * z(0, k)[n] for k, ak in enumerate(a))
        scores[n] = (base[n] * hg / (queries * mu)).abs().view(-1)
    flat = torch.cat(list(scores.values()))
    threshold = float(flat.kthvalue(max(1, int(fraction * flat.numel()))).values)
    return {n: s <= threshold for n, s in scores.items()}, scores, threshold


def test_selection_is_the_definition_and_leaves_the_weights():
    model = tiny_model("llama", tied=False, dtype=torch.float64)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = zo_selection.select(model, _trainable(model), DistEnv(), fraction=FRACTION, queries=QUERIES, mu=MU, seed=SEED)
    for n, p in model.named_parameters():  # restored bit for bit
        assert torch.equal(p.detach(), original[n]), n
    expected, scores, threshold = reference_masks(model, FRACTION, QUERIES, MU, SEED)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == int(FRACTION * total)
    for n, m in masks.items():
        clear = (scores[n] - threshold).abs() > 1e-5 * threshold  # the fp32 threshold may split near-ties
        assert torch.equal(m[clear], expected[n][clear]), n
    # a different seed draws other directions, so it selects other entries: the selection is not a fixed pattern
    other = zo_selection.select(model, _trainable(model), DistEnv(), fraction=FRACTION, queries=QUERIES, mu=MU, seed=SEED + 1)
    assert any(not torch.equal(other[n], masks[n]) for n in masks)


def test_only_the_selected_entries_move():
    model = tiny_model("llama", tied=True, dtype=torch.float64)
    masks = zo_selection.select(model, _trainable(model), DistEnv(), fraction=FRACTION, queries=QUERIES, mu=MU, seed=SEED)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = make_step(model, C=0.5, mu=MU, lr=0.1, masks=masks)
    for t in range(2):
        step.run([[MicroBatch(tiny_batch(seed=t + 1), padding=False)]], forward_of(model))
        step.step()
    for n, p in model.named_parameters():
        moved = (p.detach() != before[n]).view(-1)
        assert torch.equal(moved, masks[n]), n  # every selected entry moved, no other did


def _sharded_masks(env, fraction: float) -> dict:
    model = tiny_model("llama", tied=False, dtype=torch.float64)
    shard_from_rank0(model, env, torch.device("cpu"))
    masks = zo_selection.select(model, _trainable(model), env, fraction=fraction, queries=QUERIES, mu=MU, seed=SEED)
    return {n: m.clone() for n, m in masks.items()}


@pytest.mark.slow
def test_fsdp2_shards_select_what_one_process_selects():
    whole = zo_selection.select(
        (model := tiny_model("llama", tied=False, dtype=torch.float64)), _trainable(model), DistEnv(),
        fraction=FRACTION, queries=QUERIES, mu=MU, seed=SEED,
    )
    ranks = run_on_ranks(2, _sharded_masks, FRACTION)
    for n, m in whole.items():  # FSDP2 shards dim 0 in order: rank 0's entries, then rank 1's
        torch.testing.assert_close(torch.cat([r[n] for r in ranks if n in r]), m, rtol=0, atol=0, msg=n)


def test_selection_runs_in_eval_mode_and_leaves_the_mode():
    """Dropout would make the scores random and draw from the run's generator: the selection of a
    model in train mode is that of the same model in eval mode, and the model stays in train mode."""
    model = tiny_model("llama", dtype=torch.float64)
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    model.eval()
    expected = zo_selection.select(model, _trainable(model), DistEnv(), fraction=FRACTION, queries=QUERIES, mu=MU, seed=SEED)
    model.train()
    state = torch.get_rng_state()
    masks = zo_selection.select(model, _trainable(model), DistEnv(), fraction=FRACTION, queries=QUERIES, mu=MU, seed=SEED)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(masks[n], expected[n]) for n in masks)
