"""LMO-DP's offline search: the law of U with the most useful noise at a budget, cached as JSON.

    python launch/lmo_search.py --epsilon 8 --sample-rate 0.016 --steps 150 --delta 1.25e-4 \\
        --out recipes/lmo/e2e_tiny_eps8_usefulness.json                 # the paper's objective
    python launch/lmo_search.py ... --objective second_moment --out recipes/lmo/e2e_tiny_eps8.json
    python launch/e2e.py --recipe recipes/e2e/tiny_cpu.yaml privacy.mechanism=lmo \\
        lmo.mixture=recipes/lmo/e2e_tiny_eps8_usefulness.json

The sample rate, steps and delta are the run's (its log's first row prints them). The run
calibrates the noise multiplier to its own budget again, so a file searched for another plan is
still sound, only not the best.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpllm.privacy.lmo_search import search  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, required=True)
    parser.add_argument("--sample-rate", type=float, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--delta", type=float, required=True)
    parser.add_argument("--candidates", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objective", choices=["usefulness", "second_moment"], default="usefulness")
    parser.add_argument("--gamma", type=float, default=0.9, help="usefulness: P(|Z| <= gamma), in units of the L1 clip")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = search(args.epsilon, args.sample_rate, args.steps, args.delta, candidates=args.candidates, seed=args.seed,
                        objective=args.objective, gamma=args.gamma)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.out}: P(|Z| <= {args.gamma:g}) {result['usefulness']:.4g} (plain Laplace {result['laplace_usefulness']:.4g}), "
          f"E[Z^2] {result['noise_second_moment']:.4g} (plain Laplace {result['laplace_second_moment']:.4g}) "
          f"at epsilon {result['epsilon']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
