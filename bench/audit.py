"""Empirical privacy audit of the private step with one training run (white-box gradient canaries).

    python bench/audit.py [--epsilons 2] [--canaries 100000] [--guesses 1000] [--steps 4] [--seed 0]

For each claimed epsilon the noise multiplier is calibrated (PLD, full-batch Poisson sampling,
delta 1e-5); the private step then runs on the canaries on 1 and 2 processes, with the calibrated
noise and with implementations whose noise multiplier is divided by 2 and by 4 (the accountant is
still told the calibrated one). The table gives the 95% lower bound on epsilon
(dpllm/training/canary_audit.py). A correct step must stay below the claim; a bound above it is
a bug found.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpllm.distributed.env import DistEnv  # noqa: E402
from dpllm.distributed.local import run_on_ranks  # noqa: E402
from dpllm.privacy.accounting import calibrate_noise_multiplier  # noqa: E402
from dpllm.training.canary_audit import CanaryAudit, canary_scores, judge  # noqa: E402

DIVISORS = (1, 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", default="2")
    parser.add_argument("--canaries", type=int, default=100_000)
    parser.add_argument("--guesses", type=int, default=1_000, help="guesses per side (in / out), fixed in advance")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    audit = CanaryAudit(canaries=args.canaries, guesses_per_side=args.guesses, steps=args.steps)
    inserted = torch.rand(audit.canaries, generator=torch.Generator().manual_seed(args.seed)) < 0.5
    print(f"{audit.canaries} gradient canaries ({int(inserted.sum())} inserted), {audit.steps} full-batch steps, "
          f"delta {audit.delta}, {2 * audit.guesses_per_side} guesses, 95% confidence\n")
    print("| claimed epsilon | noise multiplier used | processes | right guesses | epsilon lower bound | flagged |")
    print("|---|---|---|---|---|---|")
    for claimed in (float(e) for e in args.epsilons.split(",")):
        sigma = calibrate_noise_multiplier(claimed, audit.delta, audit.sample_rate, audit.steps)
        for divisor in DIVISORS:
            for world in (1, 2):
                started = time.perf_counter()
                if world == 1:
                    scores, eps = canary_scores(DistEnv(), audit, inserted, sigma, divisor)
                else:
                    scores, eps = run_on_ranks(world, canary_scores, audit, inserted, sigma, divisor)[0]
                r = judge(audit, scores, inserted, eps)
                used = f"{sigma / divisor:.4g}" + ("" if divisor == 1 else f" (sigma / {divisor})")
                print(f"| {r.accountant_epsilon:.3g} | {used} | {world} | {r.correct}/{r.guesses} | {r.lower_bound:.3f} | "
                      f"{'yes' if r.lower_bound > r.accountant_epsilon else 'no'} |  ({time.perf_counter() - started:.1f} s)",
                      flush=True)


if __name__ == "__main__":
    main()
