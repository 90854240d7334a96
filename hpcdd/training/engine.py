"""The training engine: one epoch loop, one training state, one checkpoint format for every trainer.

The local CNNs, the global CNN, the DNN and the coherent CNN-DNN differ only in what one step
does, how validation is scored and which weights are kept; a ``Loop`` names those, and ``train``
does the rest the same way for all four: resume from a checkpoint at any step boundary, poll the
preemption flag before every step, refuse a non-finite loss, step the schedule, keep the best
weights on validation, checkpoint every epoch or every ``Checkpoints.interval`` seconds (and at a
preemption step), report each epoch.
See docs/architecture.md, "Training engine".
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from .. import atomic
from ..errors import UserError
from ..parallel.preemption import Preempted
from ..parallel.watchdog import slow_step
from . import acceleration


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the checkpoints written before it stay usable."""


def make_optimizer(params, t):
    """``t``: any config with optimizer, lr, momentum, weight_decay (TrainConfig, DNNConfig); fused
    kernels unless ``performance.fused_optimizer`` is off (``acceleration.configure``)."""
    if t.optimizer == "sgd":
        return acceleration.optimizer(torch.optim.SGD, params, lr=t.lr, momentum=t.momentum,
                                      weight_decay=t.weight_decay, nesterov=t.momentum > 0)
    return acceleration.optimizer(torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam, params, lr=t.lr,
                                  weight_decay=t.weight_decay)


def make_scheduler(optimizer, t):
    """Stepped once per epoch."""
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size, gamma=t.gamma)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1 << 30, gamma=1.0)


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


def snapshot(state: dict) -> dict:
    """A detached copy of a (nested) state dict, so later steps do not change it (values other than
    tensors, e.g. the coherent phase's fused groups, are kept as they are)."""
    return {k: snapshot(v) if isinstance(v, dict) else v.detach().clone() if torch.is_tensor(v) else v
            for k, v in state.items()}


@dataclass
class TrainState:
    """Where a training stands: enough to continue exactly where it stopped."""

    epoch: int = 0  # completed epochs
    step: int = 0  # next step of epoch ``epoch`` (non-zero only after a preemption)
    partial: dict | None = None  # the interrupted epoch's accumulators
    best: dict | None = None  # best weights on validation so far
    best_val: float = -1.0
    best_epoch: int = 0  # 0: the starting point
    history: list = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    extra: dict = field(default_factory=dict)  # the trainer's own fields (e.g. the initial validation accuracy)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class Trained:
    """What a loop trains and what its checkpoints hold of it: the weights of its members (one model,
    or the members of a fused model, hpcdd/fused.py), optimizer, schedule, and what one data-parallel
    worker holds alone mid-epoch. Every per-member value is a list, also for one member;
    ``optimizer_states``/``load_optimizer_states`` convert the optimizer's state to and from the
    members' (default: the optimizer's own, one member), so each member's checkpoint is the one it
    would have written alone."""

    weights: Callable[[], list]  # the current weights: one dict (nested state dicts) per member
    load_weights: Callable[[list], None]
    optimizer: object
    scheduler: object
    set_train: Callable[[bool], None]
    members: int = 1
    optimizer_states: Callable[[], list] | None = None
    load_optimizer_states: Callable[[list], None] | None = None
    worker_state: Callable[[], dict] | None = None  # what one worker holds alone (e.g. its BatchNorm buffers)
    load_worker_state: Callable[[dict], None] | None = None

    def __post_init__(self):
        if self.optimizer_states is None:
            self.optimizer_states = lambda: [self.optimizer.state_dict()]
            self.load_optimizer_states = lambda states: self.optimizer.load_state_dict(states[0])


@dataclass
class Checkpoints:
    """Where and when a loop checkpoints: one path per member; every epoch, or every ``interval``
    seconds (the first, the last and a stop always write one; a resume from an older one replays the
    epochs since, bit for bit)."""

    paths: list
    interval: float = 0.0
    writer: bool = True  # this worker writes them
    agree: Callable[[list], tuple | None] | None = None  # per-rank checkpoints: (epoch, step) every rank holds


@dataclass
class Hooks:
    """What a trainer is told, and may add, along the way (each optional)."""

    stop: Callable[[], bool] | None = None  # polled before every step (preemption)
    on_step: Callable[[int, int, int, int], None] | None = None  # (epoch, step, steps, minibatch rows): progress
    on_epoch: list | None = None  # one callback(event dict) per member
    on_resume: list | None = None  # one callback(TrainState) per member
    end_epoch: Callable[[], None] | None = None  # e.g. average BatchNorm buffers over replicas
    event_extra: Callable[[], dict] | None = None  # more fields for each epoch's event (e.g. communication time)


@dataclass
class Loop:
    """What differs between trainers; ``train`` does the rest: the minibatches of an epoch, one step,
    validation, what is trained (``Trained``), the hooks, where it checkpoints, its data-parallel
    workers."""

    name: str  # in messages, e.g. "local subdomain 3"
    epochs: int
    batches: Callable[[int], list]  # epoch -> minibatches (arrays of sample rows), the same on every worker
    step: Callable  # (epoch, step, rows) -> (summed loss of this worker's rows (tensor), correct (tensor), rows),
    # per member for a fused model (a scalar counts as one member's)
    evaluate: Callable[[], object]  # validation accuracy (per member), the same on every worker
    trained: Trained
    hooks: Hooks = field(default_factory=Hooks)
    checkpoints: Checkpoints | None = None
    workers: object = None  # data-parallel Group: stats summed over it, each worker holds part of a mid-epoch state
    check_every: int = 1  # steps between finiteness checks (a GPU sync each)


def _data_parallel(loop: Loop) -> bool:
    return loop.workers is not None and loop.workers.size > 1


def _save(loop: Loop, states: list) -> None:
    """With per-rank checkpoints (``agree``) and per-member ones (a fused loop) the previous one is kept
    as ``.prev`` until the next is complete, so a rank killed while writing leaves a point that every
    rank, and every member, still holds.

    Mid-epoch (a preemption) the data-parallel workers differ in their own accumulators and
    BatchNorm statistics: the writer saves every worker's (a collective), so the resumed epoch ends
    exactly as the uninterrupted one. A fused loop writes each member's checkpoint."""
    if loop.checkpoints is None:
        return
    state = states[0]
    workers = None
    if _data_parallel(loop) and state.partial is not None:
        mine = dict(loop.trained.worker_state() if loop.trained.worker_state is not None else {}, partial=state.partial)
        workers = loop.workers.gather_obj(mine)
    if not loop.checkpoints.writer:
        return
    weights = loop.trained.weights()
    optimizers = loop.trained.optimizer_states()
    shared = {"scheduler": loop.trained.scheduler.state_dict(), "rng": rng_state()}  # the same for every member
    for m, member in enumerate(states):
        path = loop.checkpoints.paths[m]
        if (loop.checkpoints.agree is not None or loop.trained.members > 1) and os.path.exists(path):
            os.replace(path, path + ".prev")
        saved = {"optimizer": optimizers[m], **shared, "weights": weights[m],
                 "state": member.state_dict()}
        if workers is not None:
            saved["workers"] = workers
        atomic.save(saved, path)


def _load_worker(loop: Loop, saved: dict, state: TrainState) -> None:
    """This worker's part of a mid-epoch data-parallel checkpoint."""
    workers = saved.get("workers")
    if workers is None or not _data_parallel(loop):
        return
    if len(workers) != loop.workers.size:
        raise UserError(f"{loop.checkpoints.paths[0]}: stopped mid-epoch with {len(workers)} data-parallel workers for "
                        f"{loop.name}, now {loop.workers.size}; resume with the ranks the run had")
    mine = workers[loop.workers.rank]
    state.partial = mine["partial"]
    if loop.trained.load_worker_state is not None:
        loop.trained.load_worker_state(mine)


class TrainingCheckpoint:
    """The files of one training's checkpoint: PATH and, while the next one is written (per-rank and
    per-member checkpoints), PATH.prev. Their format is the engine's; phases ask this object instead
    of reading or deleting the files themselves."""

    def __init__(self, path: str):
        self.path = path
        self.files = [path, path + ".prev"]

    def readable(self, device=None, current_only: bool = False):
        """(file, checkpoint) for each file that loads; ``current_only``: PATH alone, and a torn one
        raises (a single checkpoint has no older point to fall back on)."""
        for f in self.files[:1] if current_only else self.files:
            if not os.path.exists(f):
                continue
            try:
                yield f, atomic.load(f, map_location=device)
            except UserError:
                if current_only:
                    raise

    def held(self, device=None, current_only: bool = False) -> dict:
        """(epoch, step) -> checkpoint for each readable file (the newer file wins a tie)."""
        out = {}
        for _, saved in self.readable(device, current_only):
            out.setdefault(point_of(saved), saved)
        return out

    def points(self) -> set:
        """The (epoch, step) points held; an unreadable file counts as a point of its own (its path),
        never common to another checkpoint's; no file at all: the start, (0, 0)."""
        present = [f for f in self.files if os.path.exists(f)]
        if not present:
            return {(0, 0)}
        found = {}
        for f, saved in self.readable():
            try:
                found[f] = point_of(saved)
            except (KeyError, TypeError, ValueError):
                pass  # not a training checkpoint: as unreadable
        return {found.get(f, f) for f in present}

    def weights(self):
        """(file, weights) of each readable file."""
        for f, saved in self.readable():
            yield f, saved.get("weights") if isinstance(saved, dict) else None

    def discard(self) -> None:
        """Remove the checkpoint once its training is done (its result is saved elsewhere)."""
        for f in self.files:
            if os.path.exists(f):
                os.unlink(f)


def point_of(saved: dict) -> tuple:
    return int(saved["state"]["epoch"]), int(saved["state"]["step"])


def resume(loop: Loop, device):
    """The training state of ``loop.checkpoints`` loaded into the loop's models and optimizer, if any
    (one state per member, from the newest point every member's checkpoints hold)."""
    if loop.checkpoints is None:
        return None
    alone = loop.checkpoints.agree is None and loop.trained.members == 1
    helds = [TrainingCheckpoint(p).held(device, current_only=alone) for p in loop.checkpoints.paths]
    if loop.checkpoints.agree is not None:
        point = loop.checkpoints.agree(sorted(helds[0]))  # collective: the newest point every rank holds, or None
    else:  # the newest point every member holds (a stop between two members' writes leaves the older one)
        common = set.intersection(*(set(h) for h in helds))
        point = max(common) if common else None
    if point is None:
        return None
    saved = [h[point] for h in helds]
    loop.trained.load_optimizer_states([s["optimizer"] for s in saved])
    loop.trained.load_weights([s["weights"] for s in saved])
    loop.trained.scheduler.load_state_dict(saved[0]["scheduler"])
    set_rng_state(saved[0]["rng"])
    states = []
    for m, one in enumerate(saved):
        state = TrainState()
        state.load_state_dict(one["state"])
        _load_worker(loop, one, state)
        if loop.hooks.on_resume is not None:
            loop.hooks.on_resume[m](state)
        states.append(state)
    return states


def train(loop: Loop, states: list, device) -> list:
    """Run the remaining epochs of ``states`` (one per member); raise ``Preempted`` after
    checkpointing on a stop."""
    shape = (loop.trained.members,)
    if any(s.best is None for s in states):
        weights = loop.trained.weights()
        for m, s in enumerate(states):
            s.best = snapshot(weights[m]) if s.best is None else s.best
    start = states[0].epoch
    if loop.trained.members > 1 and start == 0 and states[0].step == 0 and states[0].partial is None:
        # every member holds the starting point, so a kill between two members' first writes leaves a
        # point all of them hold (the start) and the group resumes fused, as it would have run
        _save(loop, states)
    last_save = -math.inf
    for epoch in range(start, loop.epochs):
        loop.trained.set_train(True)
        batches = loop.batches(epoch)
        loss_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        correct = torch.zeros(shape, dtype=torch.float64, device=device)
        seen, done_seconds, first = 0, 0.0, 0
        if states[0].partial is not None:
            parts = [s.partial for s in states]
            loss_sum = torch.stack([p["loss_sum"] for p in parts]).reshape(shape).to(device)
            correct = torch.stack([p["correct"] for p in parts]).reshape(shape).to(device)
            seen, done_seconds, first = int(parts[0]["seen"]), float(parts[0]["seconds"]), states[0].step
            for s in states:
                s.partial, s.step = None, 0
        t0 = time.perf_counter()
        for step in range(first, len(batches)):
            if loop.hooks.stop is not None and loop.hooks.stop():
                flat_loss, flat_correct = loss_sum.cpu().reshape(-1), correct.cpu().reshape(-1)
                for m, s in enumerate(states):
                    s.epoch, s.step = epoch, step
                    s.partial = {"loss_sum": flat_loss[m].reshape(()).clone(), "correct": flat_correct[m].reshape(()).clone(),
                                 "seen": seen, "seconds": done_seconds + time.perf_counter() - t0}
                _save(loop, states)
                raise Preempted()
            t_step = time.perf_counter() if step == first else None
            if t_step is not None and epoch == start:
                with slow_step("its first training step (torch.compile compiles in it)"):
                    step_loss, step_correct, rows = loop.step(epoch, step, batches[step])
            else:
                step_loss, step_correct, rows = loop.step(epoch, step, batches[step])
            if t_step is not None and epoch == start:
                # the first step of each start: torch.compile compiles in it (reported per training)
                for s in states:
                    s.extra.setdefault("first_step_seconds", []).append(time.perf_counter() - t_step)
            loss_sum += step_loss.detach().double()
            correct += step_correct.detach().double()
            seen += rows
            if loop.hooks.on_step is not None:
                loop.hooks.on_step(epoch, step, len(batches), len(batches[step]))
            if (step + 1) % loop.check_every == 0 or step == len(batches) - 1:
                value = float(loss_sum.sum())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"{loop.name}: the training loss became {value} in epoch {epoch + 1}, by step {step + 1}; "
                        f"lower the learning rate or check the data (checkpoints of earlier epochs are kept)")
        lr = float(loop.trained.optimizer.param_groups[0]["lr"])  # the rate this epoch trained at, before the step
        loop.trained.scheduler.step()
        if loop.hooks.end_epoch is not None:
            loop.hooks.end_epoch()
        seconds = done_seconds + time.perf_counter() - t0
        vals = np.asarray(loop.evaluate(), dtype=np.float64).reshape(-1)
        stats = np.stack([loss_sum.cpu().reshape(-1).numpy(), correct.cpu().reshape(-1).numpy(),
                          np.full(len(states), seen)], 1).astype(np.float64)  # (members, 3)
        if _data_parallel(loop):
            stats = loop.workers.sum(stats)
        extra = loop.hooks.event_extra() if loop.hooks.event_extra is not None else {}
        weights = None
        for m, s in enumerate(states):
            # members trained together: each is charged its share of the time, so a rank's
            # subdomains add up to its training time as when they train one after another
            share = seconds / len(states)
            event = {"epoch": epoch + 1, "epochs": loop.epochs, "loss": float(stats[m, 0] / max(stats[m, 2], 1)),
                     "train_acc": float(stats[m, 1] / max(stats[m, 2], 1)), "val_acc": float(vals[m]), "seconds": share,
                     "images_per_s": float(stats[m, 2] / max(share, 1e-9)),
                     "lr": lr, **extra}
            s.history.append(event)
            s.seconds += share
            s.images += int(stats[m, 2])
            s.epoch = epoch + 1
            if vals[m] > s.best_val:
                weights = loop.trained.weights() if weights is None else weights
                s.best_val, s.best_epoch, s.best = float(vals[m]), epoch + 1, snapshot(weights[m])
        if loop.checkpoints is not None and (epoch + 1 == loop.epochs
                                             or time.perf_counter() - last_save >= loop.checkpoints.interval):
            _save(loop, states)
            last_save = time.perf_counter()
        if loop.hooks.on_epoch is not None:
            for m, s in enumerate(states):
                loop.hooks.on_epoch[m](s.history[-1])
    return states


def run_loop(loop: Loop, device, start: Callable[[], list] | None = None) -> list:
    """Resume from the loop's checkpoints, or begin at ``start()`` (default: a fresh state per
    member); the trained states, one per member."""
    states = resume(loop, device)
    if states is None:
        states = start() if start is not None else [TrainState() for _ in range(loop.trained.members)]
    return train(loop, states, device)
