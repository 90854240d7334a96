"""Aggregators: from the N local K-class probability vectors of a sample to one decision.

``dnn``: a trained dense net on the N*K probabilities (the coarse problem of the paper);
``average``: argmax of the mean probability; ``vote``: the class most local CNNs pick, ties
broken by the larger summed probability over all local CNNs.
"""

from __future__ import annotations

import numpy as np
from torch import nn

class DNN(nn.Module):
    """Dense net over the flattened (N, K) local outputs; ``hidden`` sizes, ReLU, dropout."""

    def __init__(self, n_subdomains: int, num_classes: int, hidden=(64,), dropout: float = 0.1):
        super().__init__()
        layers, width = [nn.Flatten()], n_subdomains * num_classes
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def average(probs: np.ndarray) -> np.ndarray:
    """(n, N, K) probabilities -> (n,) class of the largest mean probability."""
    return probs.mean(axis=1).argmax(axis=1)


def vote(probs: np.ndarray) -> np.ndarray:
    """(n, N, K) -> (n,) majority of the local argmaxes; ties go to the larger summed probability."""
    n, nsub, k = probs.shape
    picks = probs.argmax(axis=2)
    counts = np.zeros((n, k))
    np.add.at(counts, (np.repeat(np.arange(n), nsub), picks.reshape(-1)), 1.0)
    # summed probability / (N + 1) < 1, so it only decides between classes with equal counts
    return (counts + probs.sum(axis=1) / (nsub + 1)).argmax(axis=1)


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(y)).mean()) if len(y) else float("nan")
