"""Augmentation that respects the decomposition: a shift and a left-right flip of the *whole* image,
which every subdomain sees the same way.

A shift moves each subdomain's window inside its stored margin (``data.crop``). A flip of the whole
image shows subdomain (r, c) the flipped subimage of its mirror (r, nx-1-c) (``Decomposition.mirror``),
so a rank that flips also reads its subdomains' mirror shards. Both are pure functions of (seed,
epoch, sample id) (``rng.Stream``): every rank, rank count and resumed run draws the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = ("augment_shift", "augment_flip")  # the TrainConfig fields that augment


@dataclass(frozen=True)
class Augmentation:
    """One epoch's augmentation of a split: per sample a shift (n, dims) and a flip (n,), or None."""

    shifts: np.ndarray | None = None
    flips: np.ndarray | None = None

    def __getitem__(self, rows) -> "Augmentation":
        return Augmentation(None if self.shifts is None else self.shifts[rows],
                            None if self.flips is None else self.flips[rows])


def augmentation(stream, epoch: int, ids: np.ndarray, t, dims: int) -> Augmentation | None:
    """The augmentation a training ``t`` (TrainConfig; a DNNConfig has none) draws in ``epoch``."""
    shifts = stream.shifts(epoch, ids, getattr(t, "augment_shift", 0), dims)
    flips = stream.flips(epoch, ids) if getattr(t, "augment_flip", False) else None
    return None if shifts is None and flips is None else Augmentation(shifts, flips)
