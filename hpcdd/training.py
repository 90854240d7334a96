"""The training loop shared by every phase that trains a CNN on one kind of input.

``fit`` trains one model on one split, optionally data-parallel over a communicator (each worker a
slice of every minibatch, one Allreduce of gradients per step), keeps the best-on-validation
weights and checkpoints every epoch. Randomness comes from counters (``hpcdd.rng``), so the result
does not depend on how many ranks trained the model or whether the run was resumed.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, rng
from .config import TrainConfig
from .parallel import allreduce_grads_, allreduce_mean_, slice_rows

# purposes mixed into seeds, so that no two random streams coincide
TAG_INIT, TAG_ORDER, TAG_DROPOUT, TAG_SHIFT, TAG_DNN, TAG_COHERENT, TAG_GLOBAL = range(1, 8)


def make_optimizer(params, t: TrainConfig):
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.momentum > 0)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(optimizer, t: TrainConfig):
    """Stepped once per epoch."""
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size, gamma=t.gamma)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1 << 30, gamma=1.0)


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> list[np.ndarray]:
    """Minibatches of one epoch: the same on every rank. A trailing batch of one sample is dropped
    (batch normalisation cannot train on it)."""
    order = rng.permutation(rng.mix(seed, TAG_ORDER, epoch), n)
    batches = [order[a:a + batch_size] for a in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def epoch_shifts(seed: int, epoch: int, ids: np.ndarray, max_shift: int, dims: int) -> np.ndarray | None:
    """Per-sample translation, a function of (seed, epoch, sample id) only: every subimage of a
    sample moves the same way, whichever rank holds it."""
    if max_shift <= 0:
        return None
    return rng.per_sample_ints(rng.mix(seed, TAG_SHIFT, epoch), ids, -max_shift, max_shift, dims)


def seed_step(*counters: int) -> None:
    """Seed the global torch generator (dropout) from counters, not from history."""
    torch.manual_seed(rng.mix(*counters))


@torch.no_grad()
def logits_of(model, data, device, batch_size: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(n, K) logits of ``model`` in eval mode over ``rows`` (default: all) of a SplitData."""
    rows = np.arange(len(data)) if rows is None else rows
    was = model.training
    model.eval()
    out = []
    for a in range(0, len(rows), batch_size):
        x, _ = data.batch(rows[a:a + batch_size])
        out.append(model(x.to(device, non_blocking=True)).float().cpu())
    model.train(was)
    k = model_classes(model)
    return torch.cat(out).numpy() if out else np.zeros((0, k), np.float32)


def model_classes(model) -> int:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features


def accuracy_of(model, data, device, batch_size: int, comm=None, parts: int = 1, part: int = 0) -> float:
    """Accuracy on a split; with ``parts`` > 1 each worker scores a slice and the counts are summed."""
    rows = np.arange(len(data))[slice_rows(len(data), parts, part)]
    logits = logits_of(model, data, device, batch_size, rows)
    correct = np.array([(logits.argmax(1) == data.y.numpy()[rows]).sum(), len(rows)], dtype=np.float64)
    if comm is not None and parts > 1:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, correct, op=MPI.SUM)
    return float(correct[0] / max(correct[1], 1))


def buffers_of(model) -> list:
    return [b for b in model.buffers() if b.dtype.is_floating_point]


def train_step(model, opt, params, x, y, batch: int, comm=None):
    """One optimizer step on this worker's rows of a minibatch of ``batch`` samples.

    The loss is the sum over this worker's rows divided by the whole minibatch, so summing the
    gradients over the data-parallel workers (one Allreduce) gives the minibatch gradient.
    """
    out = model(x)
    loss = F.cross_entropy(out, y, reduction="sum") / batch
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if comm is not None:
        allreduce_grads_(params, comm)
    opt.step()
    return loss, out


@dataclass
class FitResult:
    best_state: dict
    best_val: float
    best_epoch: int
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    images: int = 0


@dataclass
class Fit:
    """One model, one training split: everything ``fit`` needs besides the model itself."""

    train: object
    val: object
    t: TrainConfig
    seed: int
    key: tuple  # counters that make this model's random streams unique (e.g. (TAG_..., subdomain))
    device: object
    eval_batch: int = 512
    comm: object = None  # data-parallel group (None or size 1: no communication)
    ckpt_path: str | None = None
    writer: bool = True  # this worker writes the checkpoint
    on_epoch: object = None  # callback(event dict)
    stop: object = None  # callable -> bool, polled at every step boundary (preemption)


def rng_state() -> dict:
    """torch, numpy and Python generator states as plain types (for weights_only checkpoints)."""
    import random

    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]}}


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def training_state(opt, sched, **fields) -> dict:
    """A training checkpoint: optimizer, scheduler and RNG states plus the caller's fields."""
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(), **fields}


def restore_training(path: str, opt, sched, device) -> dict:
    """Load a ``training_state`` checkpoint into the optimizer, scheduler and RNGs; return it."""
    state = checkpoint.load(path, map_location=device)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def fit(model, spec: Fit) -> FitResult:
    """Train, validate every epoch, keep the best weights; resumable at any step boundary."""
    from .preemption import Preempted

    t, device = spec.t, spec.device
    parts = spec.comm.Get_size() if spec.comm is not None else 1
    part = spec.comm.Get_rank() if spec.comm is not None else 0
    params = list(model.parameters())
    opt = make_optimizer(params, t)
    sched = make_scheduler(opt, t)
    result = FitResult(best_state=copy.deepcopy(model.state_dict()), best_val=-1.0, best_epoch=-1)
    start_epoch, start_step, partial = 0, 0, None
    if spec.ckpt_path and os.path.exists(spec.ckpt_path):
        state = restore_training(spec.ckpt_path, opt, sched, device)
        model.load_state_dict(state["model"])
        start_epoch, start_step, partial = int(state["epoch"]), int(state["step"]), state["partial"]
        result = FitResult(state["best_state"], float(state["best_val"]), int(state["best_epoch"]),
                           list(state["history"]), float(state["train_seconds"]), int(state["images"]))

    def save(epoch: int, step: int, partial_state) -> None:
        if spec.ckpt_path and spec.writer:
            checkpoint.save(training_state(opt, sched, model=model.state_dict(), epoch=epoch, step=step,
                                           partial=partial_state, best_state=result.best_state,
                                           best_val=result.best_val, best_epoch=result.best_epoch,
                                           history=result.history, train_seconds=result.train_seconds,
                                           images=result.images), spec.ckpt_path)

    dims = spec.train.x.dim() - 2 if spec.train.in_memory else len(spec.train.reader.expected_shape()) - 1
    n = len(spec.train)
    for epoch in range(start_epoch, t.epochs):
        model.train()
        batches = epoch_batches(spec.seed, epoch, n, t.batch_size)
        shifts = epoch_shifts(spec.seed, epoch, spec.train.ids, t.augment_shift, dims)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen, done_seconds, first = 0, 0.0, 0
        if partial is not None and epoch == start_epoch:
            loss_sum, correct = partial["loss_sum"].to(device), partial["correct"].to(device)
            seen, done_seconds, first = int(partial["seen"]), float(partial["seconds"]), start_step
        t0 = time.perf_counter()
        for step in range(first, len(batches)):
            if spec.stop is not None and spec.stop():
                save(epoch, step, {"loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "seen": seen,
                                   "seconds": done_seconds + time.perf_counter() - t0})
                raise Preempted()
            rows = batches[step]
            mine = rows[slice_rows(len(rows), parts, part)]
            seed_step(spec.seed, TAG_DROPOUT, *spec.key, epoch, step, part)
            x, y = spec.train.batch(mine, None if shifts is None else shifts[mine])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, out = train_step(model, opt, params, x, y, len(rows), spec.comm if parts > 1 else None)
            loss_sum += loss.detach() * len(rows)
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(mine)
        sched.step()
        if parts > 1:
            allreduce_mean_(buffers_of(model), spec.comm, parts)
        seconds = done_seconds + time.perf_counter() - t0
        val = accuracy_of(model, spec.val, device, spec.eval_batch, spec.comm, parts, part)
        stats = np.array([float(loss_sum), float(correct), seen], dtype=np.float64)
        if parts > 1:
            from mpi4py import MPI

            spec.comm.Allreduce(MPI.IN_PLACE, stats, op=MPI.SUM)
        event = {"epoch": epoch + 1, "epochs": t.epochs, "loss": float(stats[0] / max(stats[2], 1)),
                 "train_acc": float(stats[1] / max(stats[2], 1)), "val_acc": float(val), "seconds": seconds,
                 "images_per_s": float(stats[2] / max(seconds, 1e-9)), "lr": float(opt.param_groups[0]["lr"])}
        result.history.append(event)
        result.train_seconds += seconds
        result.images += int(stats[2])
        if val > result.best_val:
            result.best_val, result.best_epoch = val, epoch + 1
            result.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save(epoch + 1, 0, None)
        if spec.on_epoch is not None:
            spec.on_epoch(event)
    return result
