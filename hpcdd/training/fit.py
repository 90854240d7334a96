"""Training one model on one kind of input (the local CNNs, the global CNN, the DNN) with the engine.

``fit`` trains on one split, optionally data-parallel over a ``Group`` (each worker a slice of
every minibatch, one Allreduce of gradients per step), and scores validation every epoch.
Randomness comes from counters (``hpcdd.training.rng.Stream``), so the result does not depend on how many
ranks trained the model or whether the run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..augmentation import augmentation
from ..data import MemberData
from ..metrics import scores
from ..parallel.collectives import Group
from ..parallel.ownership import slice_rows
from ..parallel.watchdog import alive
from .acceleration import autocast, full_precision
from .engine import Checkpoints, Hooks, Loop, Trained, make_optimizer, make_scheduler, run_loop
from .rng import Stream, seed_torch


@torch.no_grad()
def logits_of(model, data, device, batch_size: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(n, K) logits of ``model`` in eval mode over ``rows`` (default: all) of a split; (n, G, K) for
    a fused model."""
    rows = np.arange(len(data)) if rows is None else rows
    was = model.training
    model.eval()
    out = []
    for a in range(0, len(rows), batch_size):
        alive()
        x, _ = data.batch(rows[a:a + batch_size])
        with autocast(device):
            out.append(model(x.to(device, non_blocking=True)).float().cpu())
    model.train(was)
    if out:
        return torch.cat(out).numpy()
    k = [m for m in model.modules() if hasattr(m, "out_features")][-1].out_features
    members = getattr(model, "members", 1)
    return np.zeros((0, members, k) if members > 1 else (0, k), np.float32)


def group_logits(groups: dict, data: dict, device, batch_size: int, rows: np.ndarray | None = None) -> dict:
    """Subdomain -> (n, K) logits over ``rows`` of its split (``data[i]``), from ``groups``: a tuple of
    subdomains -> the module that computes them (one local CNN, or a fused model of several)."""
    out = {}
    for group, model in groups.items():
        if len(group) == 1:
            out[group[0]] = logits_of(model, data[group[0]], device, batch_size, rows)
        else:
            both = logits_of(model, MemberData([data[i] for i in group]), device, batch_size, rows)
            out.update({i: both[:, g] for g, i in enumerate(group)})
    return out


def accuracy_of(model, data, device, batch_size: int, group: Group = Group()):
    """Accuracy on a split; each worker of ``group`` scores a slice and the counts are summed. A fused
    model (outputs (n, G, K), labels (n, G)) gets one accuracy per member."""
    rows = np.arange(len(data))[slice_rows(len(data), group.size, group.rank)]
    logits = logits_of(model, data, device, batch_size, rows)
    hits = (logits.argmax(-1) == data.y.numpy()[rows]).sum(0)
    counts = group.sum(np.append(np.asarray(hits, dtype=np.float64), len(rows)))
    accuracy = counts[:-1] / max(counts[-1], 1)
    return accuracy if getattr(model, "members", 1) > 1 else float(accuracy[0])


def test_scores(model, data, device, batch_size: int, group: Group = Group()) -> dict:
    """``test`` (the accuracy, as ``accuracy_of`` counts it) and hpcdd.metrics.scores of a split, each
    worker of ``group`` computing a slice: the slices' logits are summed into one (n, K) array (zeros
    elsewhere: exact), one Allreduce of n x K floats."""
    n = len(data)
    rows = np.arange(n)[slice_rows(n, group.size, group.rank)]
    mine = logits_of(model, data, device, batch_size, rows)
    logits = np.zeros((n, mine.shape[-1]), dtype=np.float32)
    logits[rows] = mine
    logits = group.sum(logits.reshape(-1)).reshape(n, -1)
    pred, y = logits.argmax(1), data.y.numpy()
    probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
    return {"test": float((pred == y).sum() / max(n, 1)), **scores(pred, y, logits.shape[1], probs[:, -1])}


def buffers_of(model) -> list:
    return [b for b in model.buffers() if b.dtype.is_floating_point]


def train_step(model, opt, params, x, y, batch: int, group: Group = Group()):
    """One optimizer step on this worker's rows of a minibatch of ``batch`` samples.

    The loss is the sum over this worker's rows divided by the whole minibatch, so summing the
    gradients over the data-parallel workers (one Allreduce) gives the minibatch gradient.
    Returns (summed loss of these rows (one per member of a fused model), outputs).
    """
    by_hand = getattr(model, "forward_backward", None)
    if by_hand is not None and model.training:  # the DNN (aggregators.DNN): float32, without autograd
        total, out = by_hand(x, y, batch)
    else:
        with autocast(x.device):
            out = model(x)
        out = full_precision(out)
        if out.dim() == 3:  # a fused model: (B, G, K) outputs, (B, G) labels, one summed loss per member
            total = F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(0)
        else:
            total = F.cross_entropy(out, y, reduction="sum")
        opt.zero_grad(set_to_none=True)
        (total.sum() / batch).backward()
    group.sum_grads_(params)
    opt.step()
    return total, out


@dataclass
class Fit:
    """One model, one training split: everything ``fit`` needs besides the model itself."""

    name: str  # in messages, e.g. "local subdomain 3"
    train: object  # SplitData or TensorData
    val: object
    t: object  # TrainConfig or DNNConfig
    stream: Stream  # a fused model's members share its minibatch order; their dropout streams are the model's
    device: object
    eval_batch: int = 512
    group: Group = Group()  # data-parallel workers (size 1: no communication)
    checkpoint: list | None = None  # one path per member (one for a single model)
    checkpoint_interval: float = 0.0  # seconds between epoch checkpoints (0: every epoch; engine.Loop)
    writer: bool = True  # this worker writes the checkpoint
    on_epoch: list | None = None  # one callback(event dict) per member
    on_resume: list | None = None  # one callback(TrainState) per member
    on_step: object = None  # callback(epoch, step, steps, rows): progress
    stop: object = None  # callable -> bool, polled at every step boundary (preemption)


def fit(model, spec: Fit):
    """Train, validate every epoch, keep the best weights (``state.best["model"]``); resumable. One
    TrainState per member comes back (one for a single model).

    ``model`` may be a ``fused.Fused`` (several local CNNs as one, ``spec.train``/``spec.val`` a
    ``MemberData``): then every member is validated, selected and checkpointed on its own."""
    t, device, group = spec.t, spec.device, spec.group
    members = getattr(model, "members", 1)
    params = list(model.parameters())
    opt = make_optimizer(params, t)
    epoch_aug = {}

    def batches(epoch):
        epoch_aug.clear()
        epoch_aug[epoch] = augmentation(spec.stream, epoch, spec.train.ids, t, spec.train.dims)
        batches = spec.stream.batches(epoch, len(spec.train), t.batch_size, getattr(spec.train, "plan", None))
        if hasattr(spec.train, "schedule") and batches:
            spec.train.schedule(np.concatenate(batches))
        return batches

    def step(epoch, step, rows):
        mine = rows[slice_rows(len(rows), group.size, group.rank)]
        if members > 1:
            model.seed_step(epoch, step, group.rank)
        else:
            seed_torch(*spec.stream.step_counters(epoch, step, group.rank))
        aug = epoch_aug[epoch]
        x, y = spec.train.batch(mine, None if aug is None else aug[mine])
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        total, out = train_step(model, opt, params, x, y, len(rows), group)
        return total, (out.detach().argmax(-1) == y).sum(0), len(mine)

    trained = Trained(
        weights=lambda: [{"model": w} for w in model.member_state_dicts()] if members > 1 else [{"model": model.state_dict()}],
        load_weights=(lambda w: model.load_member_state_dicts([m["model"] for m in w])) if members > 1
        else lambda w: model.load_state_dict(w[0]["model"]),
        optimizer=opt, scheduler=make_scheduler(opt, t), set_train=model.train, members=members,
        optimizer_states=(lambda: model.member_optimizer_states(opt.state_dict())) if members > 1 else None,
        load_optimizer_states=(lambda states: model.load_member_optimizer_states(opt, states)) if members > 1 else None,
        worker_state=lambda: {"buffers": [b.detach().cpu().clone() for b in buffers_of(model)]},
        load_worker_state=lambda mine: [b.copy_(v) for b, v in zip(buffers_of(model), mine["buffers"])])
    hooks = Hooks(stop=spec.stop, on_step=spec.on_step, on_epoch=spec.on_epoch, on_resume=spec.on_resume,
                  end_epoch=(lambda: group.mean_(buffers_of(model))) if group.size > 1 else None)
    loop = Loop(
        name=spec.name, epochs=t.epochs, batches=batches, step=step,
        evaluate=lambda: accuracy_of(model, spec.val, device, spec.eval_batch, group), trained=trained, hooks=hooks,
        checkpoints=Checkpoints(spec.checkpoint, spec.checkpoint_interval, spec.writer) if spec.checkpoint else None,
        workers=group, check_every=1 if str(device) == "cpu" else 25)
    return run_loop(loop, device)
