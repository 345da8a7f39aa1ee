"""A seeded bijection on [0, n) evaluated pointwise: the shuffled window order of one epoch.

We use a 4-round Feistel network on the smallest even bit width covering n, with cycle walking to
stay inside [0, n). Looking up where position i goes costs O(1) time and memory, independent of n
and of the epoch, so the mixer needs no per-epoch permutation array (whose memory would grow with
the dataset) and the batch at step 10**7 costs what the batch at step 10 costs.

`permute_many` looks up many positions at once, each with its own domain size and round keys (a
batch holds rows of several datasets and epochs). The same arithmetic runs on numpy uint64 arrays,
one element per lookup, or on Python ints: an array operation costs about a microsecond however
small the array, so a handful of lookups (and the last few cycle walks) are cheaper as plain ints.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

ROUNDS = 4
_M64 = (1 << 64) - 1
SCALAR_LIMIT = 8  # at most this many lookups (or walks left) go through Python ints


def _mix64(x):
    """splitmix64's finaliser: a fast, well-spread 64-bit hash of a Python int or a uint64 array."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64  # the mask is a no-op on uint64, needed on ints
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def permutation_key(seed: int, name: str, epoch: int) -> int:
    """The 64-bit key of one (seed, dataset, epoch) permutation; stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def round_keys(key: int) -> tuple[int, ...]:
    """The ROUNDS per-round keys derived from one 64-bit key."""
    return tuple(_mix64((key + r + 1) & _M64) for r in range(ROUNDS))


def half_width(n: int) -> int:
    """Bits per Feistel half for domain size n: half the smallest even width covering [0, n)."""
    return max(1, ((n - 1).bit_length() + 1) // 2)


def _encrypt(x, half, mask, keys):
    """One pass of the network; x, half and mask are ints or uint64 arrays, keys[r] likewise."""
    left, right = x >> half, x & mask
    for round_key in keys:
        left, right = right, left ^ (_mix64(right ^ round_key) & mask)
    return (left << half) | right


def _walk(x: int, n: int, half: int, keys: tuple[int, ...]) -> int:
    """Apply the network to x until the value lands in [0, n) (at least once)."""
    # Cycle walking: the network permutes [0, 4**half) (< 4n values), so re-applying it until the
    # value lands in [0, n) ends after a few passes on average and keeps the map a bijection.
    mask = (1 << half) - 1
    x = _encrypt(x, half, mask, keys)
    while x >= n:
        x = _encrypt(x, half, mask, keys)
    return x


def permute_many(positions: np.ndarray, n: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Where positions[i] goes under the permutation of [0, n[i]) with round keys keys[i] (ROUNDS of them).

    positions and n are int64 arrays, keys a (len, ROUNDS) uint64 array; returns int64. Raises
    ValueError for a position outside its domain.
    """
    positions, n = np.asarray(positions, dtype=np.int64), np.asarray(n, dtype=np.int64)
    outside_domain = (positions < 0) | (positions >= n)
    if outside_domain.any():
        bad = int(np.flatnonzero(outside_domain)[0])
        raise ValueError(f"position {int(positions[bad])} outside [0, {int(n[bad])})")
    sizes = n.tolist()
    halves = {size: half_width(size) for size in set(sizes)}  # one size per dataset in the batch
    if len(positions) <= SCALAR_LIMIT:
        return np.array(
            [_walk(p, size, halves[size], tuple(k)) for p, size, k in zip(positions.tolist(), sizes, keys.tolist())],
            dtype=np.int64,
        )
    half = np.array([halves[size] for size in sizes], dtype=np.uint64)
    mask = (np.uint64(1) << half) - np.uint64(1)
    columns = np.ascontiguousarray(keys.T)  # keys[r] of all lookups, contiguous
    limit = n.astype(np.uint64)
    x = _encrypt(positions.astype(np.uint64), half, mask, columns)
    outside = np.flatnonzero(x >= limit)
    while outside.size > SCALAR_LIMIT:
        x[outside] = _encrypt(x[outside], half[outside], mask[outside], columns[:, outside])
        outside = outside[x[outside] >= limit[outside]]
    for i in outside.tolist():  # x[i] is outside [0, n), so walking on from it continues its cycle
        x[i] = _walk(int(x[i]), int(limit[i]), int(half[i]), tuple(columns[:, i].tolist()))
    return x.astype(np.int64)


class FeistelPermutation:
    """The bijection of [0, n) for one key."""

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError(f"n: {n}; a permutation needs a domain of at least one element")
        self.n = n
        self.keys = np.array(round_keys(key), dtype=np.uint64)

    def many(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        count = len(positions)
        return permute_many(positions, np.full(count, self.n, dtype=np.int64), np.broadcast_to(self.keys, (count, ROUNDS)))

    def __call__(self, position: int) -> int:
        return int(self.many(np.array([position]))[0])


def permute(positions: Iterable[int], n: int, key: int) -> np.ndarray:
    """Where each position in [0, n) goes under the permutation keyed by `key` (int64 array)."""
    return FeistelPermutation(n, key).many(np.fromiter(positions, dtype=np.int64))
