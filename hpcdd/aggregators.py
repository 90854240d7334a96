"""Aggregators: from the N local K-class probability vectors of a sample to one decision.

``dnn``: a trained dense net on the N*K probabilities (the coarse problem of the paper);
``average``: argmax of the mean probability; ``vote``: the class most local CNNs pick, ties
broken by the larger summed probability over all local CNNs.
"""

from __future__ import annotations

import numpy as np
import torch
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

    @torch.no_grad()
    def forward_backward(self, z, y, batch: int):
        """One training step's forward and backward by hand, as autograd computes them for
        ``cross_entropy(self(z), y, reduction="sum") / batch``; sets every parameter's ``.grad``.
        Returns (summed loss, logits).

        Why: a DNN step is ~20 small operations, and autograd's bookkeeping was a third of it (0.51 ->
        0.32 ms a step of the engine's ``train_step``, measured), with 3400 steps on rank 0 while the other ranks wait. Dropout masks
        come from the global generator as ``F.dropout`` draws them on the CPU (``bernoulli_(1 - p)``,
        divided by 1 - p), so a step seeded the same way drops the same units (tests/test_units.py)."""
        layers = [m for m in self.net if isinstance(m, nn.Linear)]
        p = next((m.p for m in self.net if isinstance(m, nn.Dropout)), 0.0)
        keep = 1.0 - p
        a = z.reshape(len(z), -1)
        inputs, relus, masks = [], [], []
        for layer in layers[:-1]:
            inputs.append(a)
            r = torch.addmm(layer.bias, a, layer.weight.t()).relu_()
            relus.append(r)
            if p > 0:
                mask = torch.empty_like(r).bernoulli_(keep).div_(keep)
                masks.append(mask)
                r = r * mask
            a = r
        inputs.append(a)
        out = torch.addmm(layers[-1].bias, a, layers[-1].weight.t())
        logp = out.log_softmax(1)
        picked = logp.gather(1, y[:, None])
        total = -picked.sum()
        g = logp.exp_().scatter_(1, y[:, None], picked.exp().sub_(1.0)).div_(batch)
        for i in range(len(layers) - 1, -1, -1):
            layers[i].weight.grad = g.t().mm(inputs[i])
            layers[i].bias.grad = g.sum(0)
            if i:
                g = g.mm(layers[i].weight)
                if masks:
                    g.mul_(masks[i - 1])
                g = torch.ops.aten.threshold_backward(g, relus[i - 1], 0.0)  # ReLU's backward, as autograd's
        return total, out


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
