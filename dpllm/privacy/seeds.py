"""The secret randomness a run's guarantee rests on: the Poisson sample and the noise.

One root seed per run, drawn from ``os.urandom`` on rank 0 unless the user fixes it
(``privacy.noise_seed``), broadcast to every rank, and turned into one seed per purpose. The
root never appears in a published file: anyone holding it could replay every noise draw and
subtract it from the released model.
"""

from __future__ import annotations

import hashlib
import os


def secret_seed() -> int:
    """128 bits from the operating system's cryptographic source."""
    return int.from_bytes(os.urandom(16), "little")


def derive(root: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` ("noise", "sampler"), independent of the others."""
    digest = hashlib.blake2b(f"{root}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
