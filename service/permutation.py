"""A seeded bijection on [0, n) evaluated pointwise: the shuffled window order of one epoch.

We use a 4-round Feistel network on the smallest even bit width covering n, with cycle walking to
stay inside [0, n). Looking up where position i goes costs O(1) time and memory, independent of n
and of the epoch, so the mixer needs no per-epoch permutation array (whose memory would grow with
the dataset) and the batch at step 10**7 costs what the batch at step 10 costs.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

ROUNDS = 4
_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def permutation_key(seed: int, name: str, epoch: int) -> int:
    """The 64-bit key of one (seed, dataset, epoch) permutation; stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class FeistelPermutation:
    """The bijection of [0, n) for one key. Plain integers: a batch asks for a handful of positions,
    where per-call numpy overhead would cost more than the arithmetic."""

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError(f"n: {n}; a permutation needs a domain of at least one element")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.round_keys = [_mix64((key + r + 1) & _M64) for r in range(ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right, mask = x >> self.half, x & self.mask, self.mask
        for round_key in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & mask)
        return (left << self.half) | right

    def __call__(self, position: int) -> int:
        if not 0 <= position < self.n:
            raise ValueError(f"position {position} outside [0, {self.n})")
        # Cycle walking: the network permutes [0, 4**half) (< 4n values), so re-applying it until the
        # value lands in [0, n) ends after a few rounds on average and keeps the map a bijection.
        x = self._encrypt(position)
        while x >= self.n:
            x = self._encrypt(x)
        return x


def permute(positions: Iterable[int], n: int, key: int) -> np.ndarray:
    """Where each position in [0, n) goes under the permutation keyed by `key` (int64 array)."""
    permutation = FeistelPermutation(n, key)
    return np.fromiter((permutation(int(p)) for p in positions), dtype=np.int64)
