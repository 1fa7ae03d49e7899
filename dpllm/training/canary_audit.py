"""A white-box one-run audit of the private step the trainer runs (one process or several).

Gradient canaries (Steinke, Nasr & Jagielski 2023, white box): canary j is a training example
whose gradient is 2C along coordinate j of embedding tables (canaries x 1 in all) and zero elsewhere, so that
clipping cuts it to exactly C and no other example touches that coordinate. Each canary joins the
dataset with probability 1/2; the step (clip, sum, reduce, noise, average, SGD) runs as in
training; the auditor scores canary j by how far coordinate j moved, guesses "in" for the k
highest and "out" for the k lowest scores, and turns the right guesses into a lower bound on
epsilon (:mod:`dpllm.privacy.audit`). A bound above the accountant's epsilon shows a bug.

``noise_divisor`` emulates such a bug: the noise drawn is that of a noise multiplier divided by
it, while the accountant is told the calibrated one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpllm.distributed import DistEnv
from dpllm.privacy.accountant import PrivacyAccountant
from dpllm.privacy.audit import epsilon_lower_bound
from dpllm.privacy.noise import GaussianNoise
from dpllm.privacy.sampling import PoissonSampler, micro_batches, rank_share
from dpllm.steps import PrivateStep, ShardedPrivateStep


@dataclass(frozen=True)
class CanaryAudit:
    canaries: int = 100_000
    guesses_per_side: int = 1_000  # fixed in advance, not chosen from the scores
    steps: int = 4
    sample_rate: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    micro_batch: int = 16_384
    tables: int = 2  # the most processes it runs on: each owns whole tensors


@dataclass(frozen=True)
class AuditResult:
    accountant_epsilon: float
    correct: int
    guesses: int
    lower_bound: float


class CanaryTables(nn.Module):
    """The canaries' coordinates, zero at the start, split over ``tables`` (rows x 1) embedding
    tables so that several processes each own one: canary j is row j % rows of table j // rows.
    Every table is looked up for every canary and masked, so the others get exactly zero."""

    def __init__(self, canaries: int, tables: int):
        super().__init__()
        self.rows = -(-canaries // tables)
        self.canaries = canaries
        self.tables = nn.ModuleList(nn.Embedding(self.rows, 1) for _ in range(tables))
        for table in self.tables:
            nn.init.zeros_(table.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        which, row = ids // self.rows, ids % self.rows
        return sum(table(row) * (which == t).unsqueeze(-1) for t, table in enumerate(self.tables))

    def coordinates(self) -> torch.Tensor:
        return torch.cat([t.weight.detach().flatten() for t in self.tables])[: self.canaries]


def canary_scores(env: DistEnv, audit: CanaryAudit, inserted: torch.Tensor, noise_multiplier: float,
                  noise_divisor: float = 1.0, seed: int | None = None) -> tuple[torch.Tensor, float]:
    """Train on the inserted canaries through the private step; how far each canary's coordinate
    moved, and the accountant's epsilon."""
    model = CanaryTables(audit.canaries, audit.tables)
    members = torch.nonzero(inserted).flatten()
    C = audit.max_grad_norm
    common = dict(
        max_grad_norm=C, noise=GaussianNoise(noise_multiplier, C, seed=seed), noise_multiplier=noise_multiplier,
        sample_rate=audit.sample_rate, expected_batch_size=1.0, accountant=PrivacyAccountant(audit.delta),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    if env.distributed:
        step = ShardedPrivateStep(model, optimizer, env=env, handover="replicated", **common)
    else:
        step = PrivateStep(model, optimizer, **common)
    step.noise.std /= noise_divisor  # the bug under test, if any
    sampler = PoissonSampler(len(members), audit.sample_rate, seed=None if seed is None else seed + 1)
    if env.distributed:  # one Poisson sample over the ranks, as the trainer draws it
        sampler.generator.manual_seed(env.broadcast_int(sampler.generator.initial_seed()))
    for _ in range(audit.steps):
        for micro in micro_batches(rank_share(sampler.sample(), env.rank, env.world_size), audit.micro_batch):
            ids = members[micro].unsqueeze(1)
            step.clip_and_accumulate(2 * C * model(ids).reshape(len(micro)))  # gradient 2C, clipped to C
        step.step()
    return -model.coordinates(), step.accountant.epsilon()


def judge(audit: CanaryAudit, scores: torch.Tensor, inserted: torch.Tensor, accountant_epsilon: float) -> AuditResult:
    order = torch.argsort(scores, descending=True)
    k = audit.guesses_per_side
    correct = int(inserted[order[:k]].sum()) + int((~inserted[order[-k:]]).sum())
    bound = epsilon_lower_bound(correct, 2 * k, audit.canaries, audit.delta)
    return AuditResult(accountant_epsilon, correct, 2 * k, bound)
