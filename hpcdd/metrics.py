"""Test-split scores beside accuracy, for classes that are not balanced: balanced accuracy (the mean of
the per-class recalls) and, for two classes, the ROC AUC. Numpy only; the phases store them in their
result.json and the report shows them where accuracy alone misleads (AdrenalMNIST3D: 78 % of one class,
so always-normal already scores 0.77)."""

from __future__ import annotations

import numpy as np

IMBALANCE = 1.5  # the report adds balanced accuracy when the test split's class counts differ by more


def balanced_accuracy(pred: np.ndarray, y: np.ndarray, k: int) -> float:
    """Mean recall over the classes present in ``y``."""
    counts = np.bincount(y, minlength=k)
    hits = np.bincount(y[pred == y], minlength=k)
    present = counts > 0
    return float(np.mean(hits[present] / counts[present])) if present.any() else 0.0


def auc(score: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC of ``score`` (higher: class 1) against labels 0/1: the probability that a random positive
    scores above a random negative, ties counted half (Mann-Whitney). None when a class is missing."""
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return None
    _, group, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[group.reshape(-1)]  # 1-based ranks, ties averaged
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def scores(pred: np.ndarray, y: np.ndarray, k: int, score1: np.ndarray | None = None) -> dict:
    """``test_balanced`` (always) and ``test_auc`` (two classes, from ``score1``: the score of class 1)."""
    out = {"test_balanced": balanced_accuracy(np.asarray(pred), np.asarray(y), k)}
    if k == 2 and score1 is not None:
        out["test_auc"] = auc(np.asarray(score1, dtype=np.float64), np.asarray(y))
    return out


def imbalanced(counts) -> bool:
    counts = [c for c in counts if c > 0]
    return bool(counts) and max(counts) > IMBALANCE * min(counts)
