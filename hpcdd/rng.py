"""Counter-based randomness: every random choice is a pure function of (seed, counters).

This is what makes results independent of the rank count and lets a resumed run reproduce an
uninterrupted one bit for bit: nothing depends on how far a stateful generator has advanced.
"""

from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix(*values: int) -> int:
    """A 63-bit seed derived from any number of integers (e.g. seed, purpose, subdomain, epoch)."""
    h = 0x6A09E667F3BCC909
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h >> 1


def _splitmix64_np(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def per_sample_ints(key: int, ids: np.ndarray, low: int, high: int, columns: int = 1) -> np.ndarray:
    """Integers in [low, high] for each sample id, a pure function of (key, id, column)."""
    ids = np.asarray(ids, dtype=np.uint64)
    out = np.empty((len(ids), columns), dtype=np.int64)
    span = np.uint64(high - low + 1)
    for c in range(columns):
        h = _splitmix64_np(ids ^ np.uint64(mix(key, c)))
        out[:, c] = (h % span).astype(np.int64) + low
    return out


def permutation(key: int, n: int) -> np.ndarray:
    """The minibatch order of one epoch: the same on every rank for the same key."""
    return np.random.default_rng(key).permutation(n)
