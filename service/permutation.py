"""A seeded bijection on [0, n) evaluated pointwise: the shuffled window order of one epoch.

We use a 4-round Feistel network on the smallest even bit width covering n, with cycle walking to
stay inside [0, n). Looking up where position i goes costs O(1) time and memory, independent of n
and of the epoch, so the mixer needs no per-epoch permutation array (whose memory would grow with
the dataset) and the batch at step 10**7 costs what the batch at step 10 costs.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 4
_M64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation_key(seed: int, name: str, epoch: int) -> int:
    """The 64-bit key of one (seed, dataset, epoch) permutation; stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _half_bits(n: int) -> int:
    return max(1, ((n - 1).bit_length() + 1) // 2)


def _feistel(x: np.ndarray, keys: np.ndarray, half: int) -> np.ndarray:
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    left, right = x >> shift, x & mask
    for r in range(ROUNDS):
        round_keys = _mix64(keys + np.uint64(r + 1))
        left, right = right, left ^ (_mix64(right ^ round_keys) & mask)
    return (left << shift) | right


def permute(positions: np.ndarray, n: int, keys: np.ndarray | int) -> np.ndarray:
    """Where each position in [0, n) goes under the permutation keyed by `keys` (one key, or one per
    position). Returns int64 values in [0, n); each key gives a bijection of [0, n)."""
    if n <= 0:
        raise ValueError(f"n: {n}; a permutation needs a domain of at least one element")
    x = np.asarray(positions, dtype=np.int64)
    if x.size and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"positions outside [0, {n})")
    x = x.astype(np.uint64)
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), x.shape).copy()
    half = _half_bits(n)
    # Cycle walking: the network permutes [0, 4**half) (< 4n values), so re-applying it until the
    # value lands in [0, n) ends after a few rounds on average and keeps the map a bijection.
    x = _feistel(x, keys, half)
    outside = x >= np.uint64(n)
    while outside.any():
        x[outside] = _feistel(x[outside], keys[outside], half)
        outside = x >= np.uint64(n)
    return x.astype(np.int64)
