"""Empirical privacy audit of the private step with one training run (Steinke, Nasr & Jagielski 2023).

    python bench/audit.py [--canaries 1000] [--steps 100] [--epsilon 8] [--seed 0]

A tiny untied Llama is trained with the real private step (per-sample clipping, Poisson
sampling, Gaussian noise, accountant) on random token sequences plus m canaries, each inserted
independently with probability 1/2. Canary j is a sequence made of one token that appears
nowhere else, so only that canary moves its input-embedding row. The auditor scores each canary
by how far its row moved, guesses "in" for the m/10 highest scores and "out" for the m/10
lowest, and turns the number of right guesses into an epsilon lower bound at 95% confidence
(dpllm/privacy/audit.py). Two runs with the same canaries and data:

  private   noise calibrated to the target epsilon: the bound must not exceed the accountant's epsilon
  no noise  the same clipped steps with a negligible noise multiplier (1e-9): the audit must detect
            the canaries, which shows it has the power to catch a missing or misplaced noise
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpllm.lm import forward_per_sample_loss  # noqa: E402
from dpllm.privacy.accountant import PrivacyAccountant  # noqa: E402
from dpllm.privacy.accounting import calibrate_noise_multiplier  # noqa: E402
from dpllm.privacy.audit import epsilon_lower_bound  # noqa: E402
from dpllm.privacy.noise import GaussianNoise  # noqa: E402
from dpllm.privacy.sampling import PoissonSampler, micro_batches  # noqa: E402
from dpllm.training.private_step import PrivateStep  # noqa: E402

REAL_VOCAB, LENGTH, REAL_EXAMPLES = 1024, 16, 1000


def build(args, canaries_in: torch.Tensor):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    vocab = REAL_VOCAB + args.canaries
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=LENGTH, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(args.seed + 1)
    real = torch.randint(0, REAL_VOCAB, (REAL_EXAMPLES, LENGTH), generator=g)
    inserted = torch.nonzero(canaries_in).flatten()
    canary_rows = (REAL_VOCAB + inserted).unsqueeze(1).expand(-1, LENGTH)
    data = torch.cat([real, canary_rows])
    return model, data


def run(args, canaries_in: torch.Tensor, noise_multiplier: float, sample_rate: float) -> tuple[torch.Tensor, PrivacyAccountant]:
    model, data = build(args, canaries_in)
    before = model.get_input_embeddings().weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    accountant = PrivacyAccountant(args.delta)
    step = PrivateStep(
        model, optimizer, max_grad_norm=1.0, noise=GaussianNoise(noise_multiplier, 1.0, seed=args.seed + 2),
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, expected_batch_size=sample_rate * len(data),
        accountant=accountant,
    )
    sampler = PoissonSampler(len(data), sample_rate, seed=args.seed + 3)
    for _ in range(args.steps):
        for micro in micro_batches(sampler.sample(), 256):
            ids = data[micro]
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            step.clip_and_accumulate(forward_per_sample_loss(model, batch))
        step.step()
    moved = (model.get_input_embeddings().weight.detach() - before)[REAL_VOCAB:]
    return moved.norm(dim=1), accountant


def audit(scores: torch.Tensor, canaries_in: torch.Tensor, k: int) -> tuple[int, int]:
    order = torch.argsort(scores, descending=True)
    guessed_in, guessed_out = order[:k], order[-k:]
    correct = int(canaries_in[guessed_in].sum()) + int((~canaries_in[guessed_out]).sum())
    return correct, 2 * k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--sample-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    canaries_in = torch.rand(args.canaries, generator=torch.Generator().manual_seed(args.seed + 4)) < 0.5
    sigma = calibrate_noise_multiplier(args.epsilon, args.delta, args.sample_rate, args.steps)
    k = args.canaries // 10
    print(f"{args.canaries} canaries ({int(canaries_in.sum())} inserted), {REAL_EXAMPLES} other examples, "
          f"{args.steps} steps at sample rate {args.sample_rate}, delta {args.delta}, {2 * k} guesses\n")
    print("| run | noise multiplier | accountant epsilon | right guesses | empirical epsilon (95% lower bound) |")
    print("|---|---|---|---|---|")
    for label, noise in (("private", sigma), ("no noise", 1e-9)):
        scores, accountant = run(args, canaries_in, noise, args.sample_rate)
        correct, guesses = audit(scores, canaries_in, k)
        shown = f"{accountant.epsilon():.3g}" if noise > 0.01 else "unbounded"  # no meaningful bound without noise
        print(f"| {label} | {noise:.4g} | {shown} | {correct}/{guesses} | {epsilon_lower_bound(correct, guesses):.3f} |")


if __name__ == "__main__":
    main()
