"""Which rank owns (adds the noise to, and denoises) each parameter's gradient.

Greedy longest-processing-time balance: parameters sorted by cost, each given to the least
loaded rank. A denoised (m, n) matrix costs an SVD, m n min(m, n); any other parameter costs its
noise draw, its size. Every rank computes the same assignment from the names and shapes alone.
"""

from __future__ import annotations

import math


def cost(shape: tuple[int, ...], denoised: bool) -> float:
    if denoised:
        m, n = shape
        return float(m * n * min(m, n))
    return float(math.prod(shape))


def assign_owners(shapes: dict[str, tuple[int, ...]], denoised: set[str], world_size: int) -> dict[str, int]:
    loads = [0.0] * world_size
    owners = {}
    for name in sorted(shapes, key=lambda n: (-cost(shapes[n], n in denoised), n)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += cost(shapes[name], name in denoised)
    return owners
