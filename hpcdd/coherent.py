"""The coherent CNN-DNN: the N local CNNs and the DNN head trained end to end as one model.

``CoherentModel`` is the single-process form (prediction, export, reference in tests).
``DistributedCoherent`` is the model-parallel form ``hpcdd.run`` trains: each rank holds only its
own local CNNs (those of one subimage shape fused into one model where the local phase fuses them,
hpcdd/fused.py); per minibatch (the same samples on every rank) it runs its local forward, an
``Allgatherv`` of the (B, K) outputs gives (B, N, K) everywhere, the small DNN runs replicated
on every rank, and the gradient of the loss with respect to (B, N, K) is what each rank feeds
back into its own local CNNs. Only outputs cross ranks; images and CNN weights never do.
Replicas of a subdomain each compute a slice of the minibatch and sum their gradients in their
group. ``dnn_input`` chooses what the DNN sees: softmax probabilities (the paper) or logits.
Where its collectives sit in a run: docs/architecture.md.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fused import load_state_dicts, state_dicts_of
from .parallel.collectives import allgather_rows
from .parallel.ownership import slice_rows
from .training.acceleration import autocast, full_precision
from .training.fit import group_logits
from .training.rng import TAG_COHERENT, TAG_DNN, mix, seed_torch


def dnn_view(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if kind == "probs" else logits


class CoherentModel(nn.Module):
    """N local CNNs + DNN: input a list of N subimage batches, output (B, K) logits."""

    def __init__(self, local_models, dnn: nn.Module, dnn_input: str = "probs"):
        super().__init__()
        self.local_models = nn.ModuleList(local_models)
        self.dnn = dnn
        self.dnn_input = dnn_input

    def forward(self, subimages, counters: tuple | None = None):
        outs = []
        for i, (model, x) in enumerate(zip(self.local_models, subimages)):
            if counters is not None:
                seed_torch(*counters, TAG_COHERENT, i)
            outs.append(dnn_view(model(x), self.dnn_input))
        if counters is not None:
            seed_torch(*counters, TAG_DNN)
        return self.dnn(torch.stack(outs, dim=1))


class DistributedCoherent:
    """One rank's share of the coherent model: its local CNNs and a replica of the DNN. ``groups``:
    a tuple of subdomains -> the module that computes them, one local CNN or a ``fused.Fused`` of
    several (each member keeps its own weights, gradients and dropout stream)."""

    def __init__(self, world, groups: dict, dnn: nn.Module, n: int, dnn_input: str = "probs"):
        self.world, self.dnn, self.n = world, dnn, n
        self.groups = dict(sorted(groups.items()))
        self.subdomains = sorted(i for group in self.groups for i in group)
        self.dnn_input = dnn_input
        own = world.own
        self.replicas, self.replica = own.replicas, own.replica
        self.table = own.table  # subdomains of every rank
        self.comm_time = 0.0
        self.comm_bytes = 0  # payload this rank sent plus received in training steps (the Allgather's
        self.comm_steps = 0  # block in and (B, N, K) out; a replica Allreduce's gradients in and out)

    @staticmethod
    def alone(models: dict) -> dict:
        """``groups`` of unfused local CNNs (subdomain -> model)."""
        return {(i,): m for i, m in models.items()}

    def parameters(self):
        yield from self.local_parameters()
        yield from self.dnn.parameters()

    def local_parameters(self):
        for m in self.groups.values():
            yield from m.parameters()

    def local_modules(self) -> list:
        return list(self.groups.values())

    def local_state_dicts(self) -> dict:
        """Subdomain -> its local CNN's weights, in the unfused format (checkpoints, results)."""
        out = {}
        for group, m in self.groups.items():
            out.update(zip(group, state_dicts_of(m)))
        return out

    def load_local_state_dicts(self, states: dict) -> None:
        for group, m in self.groups.items():
            load_state_dicts(m, [states[i] for i in group])

    def train(self, mode: bool = True):
        for m in self.groups.values():
            m.train(mode)
        self.dnn.train(mode)

    def _slices(self, batch: int) -> list[slice]:
        """Rows each rank computes (the replica's slice of the minibatch)."""
        return [slice_rows(batch, self.replicas, r % self.replicas) for r in range(self.world.size)]

    def gather_outputs(self, mine: np.ndarray, batch: int, k: int) -> np.ndarray:
        """Allgatherv of every rank's (n_owned, rows, K) block into (B, N, K)."""
        import time

        world = self.world
        if world.comm is None or world.size == 1:
            return np.ascontiguousarray(mine.transpose(1, 0, 2))
        slices = self._slices(batch)
        counts = np.array([len(self.table[r]) * (s.stop - s.start) * k for r, s in enumerate(slices)], dtype=np.int64)
        t0 = time.perf_counter()
        recv, displs = allgather_rows(world.comm, mine, counts)
        self.comm_time += time.perf_counter() - t0
        self.comm_bytes += 4 * int(counts[world.rank] + counts.sum())
        full = np.empty((batch, self.n, k), dtype=np.float32)
        for r, s in enumerate(slices):
            rows = s.stop - s.start
            block = recv[displs[r]:displs[r] + counts[r]].reshape(len(self.table[r]), rows, k)
            for j, i in enumerate(self.table[r]):
                full[s, i] = block[j]
        return full

    def step(self, xs: dict, y: torch.Tensor, batch: int, optimizer, counters: tuple):
        """One training step on a minibatch of ``batch`` samples (``xs[i]``: this rank's rows).

        Returns the minibatch loss (mean over all ``batch`` samples) and the DNN's (B, K) outputs,
        identical on every rank. ``counters`` seed the dropout of this step.
        """
        import time

        device = y.device
        mine = slice_rows(batch, self.replicas, self.replica)
        outs = {}
        for group, m in self.groups.items():
            if len(group) == 1:
                seed_torch(*counters, TAG_COHERENT, group[0])
                x = xs[group[0]]
            else:  # each member's dropout seeded as it is alone; inputs along channels (data.MemberData)
                m.seed_members([mix(*counters, TAG_COHERENT, i) for i in group])
                x = torch.cat([xs[i] for i in group], 1)
            with autocast(device):
                out = full_precision(m(x))
            outs.update({group[0]: out} if len(group) == 1 else {i: out[:, g] for g, i in enumerate(group)})
        local = torch.stack([dnn_view(outs[i], self.dnn_input) for i in self.subdomains]) if outs \
            else torch.zeros((0, mine.stop - mine.start, 0), device=device)
        k = local.shape[-1]
        full = self.gather_outputs(local.detach().float().cpu().numpy(), batch, k)
        z = torch.from_numpy(full).to(device).requires_grad_(True)
        seed_torch(*counters, TAG_DNN)
        out = self.dnn(z)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad = z.grad[mine].permute(1, 0, 2)[self.subdomains]
        torch.autograd.backward(local, grad.to(local.dtype))
        if self.replicas > 1:
            t0 = time.perf_counter()
            self.world.replicas.sum_grads_(list(self.local_parameters()))
            self.comm_time += time.perf_counter() - t0
            self.comm_bytes += 2 * 4 * sum(p.numel() for p in self.local_parameters())
        self.comm_steps += 1
        optimizer.step()
        return loss.detach(), out.detach()

    def local_outputs(self, data: dict, rows: np.ndarray, device, batch_size: int) -> np.ndarray:
        """(n_owned, len(rows), K) DNN inputs of this rank's local CNNs (eval mode)."""
        logits = group_logits(self.groups, data, device, batch_size, rows)
        outs = [dnn_view(torch.from_numpy(logits[i]), self.dnn_input).numpy() for i in self.subdomains]
        return np.stack(outs) if outs else np.zeros((0, len(rows), 0), np.float32)
