"""Counter-based randomness: every random choice is a pure function of (seed, counters).

This is what makes results independent of the rank count and lets a resumed run reproduce an
uninterrupted one bit for bit: nothing depends on how far a stateful generator has advanced.
Which trainings share which stream: docs/architecture.md, "Rules that keep ranks consistent".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# purposes mixed into seeds, so that no two random streams coincide (values are part of the results)
TAG_INIT, TAG_ORDER, TAG_DROPOUT, TAG_SHIFT, TAG_DNN, TAG_COHERENT, TAG_GLOBAL, TAG_FLIP = range(1, 9)
STRATEGY_TAGS = {"scratch": 0, "transfer": 1}

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


def chunked_permutation(key: int, n: int, block: int, window: int) -> np.ndarray:
    """An epoch order a streamed split can be read in: blocks of ``block`` consecutive rows in random
    order, grouped ``window // block`` at a time; rows shuffled within each group. Every group is
    read once, contiguously, so an epoch reads each row once in large sequential pieces."""
    rng = np.random.default_rng(key)
    blocks = rng.permutation(-(-n // block))
    per = max(1, window // block)
    parts = []
    for a in range(0, len(blocks), per):
        rows = np.concatenate([np.arange(b * block, min(b * block + block, n)) for b in blocks[a:a + per]])
        parts.append(rows[rng.permutation(len(rows))])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Stream:
    """The random streams of one training: minibatch order, shifts and flips, and per-step dropout seeds.

    ``order_key`` names the minibatch order and augmentation stream: the local CNNs and the global CNN
    share the empty key (every CNN sees the same samples in the same order, a fair comparison);
    the coherent strategies and the DNN have their own. ``key`` names the dropout stream and is
    unique per trained model (e.g. ``(0, i)`` for local CNN ``i``).
    """

    seed: int
    order_key: tuple = ()
    key: tuple = ()

    def batches(self, epoch: int, n: int, batch_size: int, plan=None) -> list[np.ndarray]:
        """Minibatches of one epoch: the same on every rank. A trailing batch of one sample is
        dropped (batch normalisation cannot train on it). ``plan`` (``hpcdd.data.StreamPlan``, the
        same on every rank): the chunk-aware order of a split streamed from its shard."""
        key = mix(self.seed, TAG_ORDER, *self.order_key, epoch)
        order = permutation(key, n) if plan is None else chunked_permutation(key, n, plan.block, plan.window)
        batches = [order[a:a + batch_size] for a in range(0, n, batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches.pop()
        return batches

    def shifts(self, epoch: int, ids: np.ndarray, max_shift: int, dims: int) -> np.ndarray | None:
        """Per-sample translation, a function of (seed, epoch, sample id) only: every subimage of a
        sample moves the same way, whichever rank holds it."""
        if max_shift <= 0:
            return None
        return per_sample_ints(mix(self.seed, TAG_SHIFT, *self.order_key, epoch), ids, -max_shift, max_shift, dims)

    def flips(self, epoch: int, ids: np.ndarray) -> np.ndarray:
        """Per-sample left-right flip of the whole image (half of the samples), a function of (seed,
        epoch, sample id) only, like ``shifts``."""
        return per_sample_ints(mix(self.seed, TAG_FLIP, *self.order_key, epoch), ids, 0, 1)[:, 0].astype(bool)

    def step_counters(self, epoch: int, step: int, *more: int) -> tuple:
        """The counters that seed the dropout of one step (``seed_torch(*counters)``)."""
        return (self.seed, TAG_DROPOUT, *self.key, epoch, step, *more)


def stream_of(seed: int, training: str, subdomain: int | None = None) -> Stream:
    """The streams of a training: ``local`` (with its subdomain), ``global``, ``dnn``, ``coherent scratch``,
    ``coherent transfer``. Every phase takes its streams from here."""
    if training == "local":
        return Stream(seed, (), (0, subdomain))
    if training == "global":
        return Stream(seed, (), (TAG_GLOBAL,))
    if training == "dnn":
        return Stream(seed, (TAG_DNN,), (TAG_DNN,))
    tag = STRATEGY_TAGS[training.split()[1]]
    return Stream(seed, (TAG_COHERENT, tag), (TAG_COHERENT, tag))


def seed_torch(*counters: int) -> None:
    """Seed the global torch generators (dropout) from counters, not from history.

    Called every training step, so it seeds only what is in use: the CPU generator, and the CUDA
    generators once CUDA is initialised. ``torch.manual_seed`` would also queue a lazy seeding for
    CUDA, XPU and MTIA, each capturing a Python stack trace: 0.3 ms a step, a fifth of a DNN step.
    """
    import torch

    seed = mix(*counters)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
