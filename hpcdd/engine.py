"""The training engine: one epoch loop, one training state, one checkpoint format for every trainer.

The local CNNs, the global CNN, the DNN and the coherent CNN-DNN differ only in what one step
does, how validation is scored and which weights are kept; a ``Loop`` names those, and ``train``
does the rest the same way for all four: resume from a checkpoint at any step boundary, poll the
preemption flag before every step, refuse a non-finite loss, step the schedule, keep the best
weights on validation, checkpoint every epoch (and at a preemption step), report each epoch.
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

from . import checkpoint
from .errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the checkpoints written before it stay usable."""


def make_optimizer(params, t):
    """``t``: any config with optimizer, lr, momentum, weight_decay (TrainConfig, DNNConfig)."""
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.momentum > 0)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


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
    """A detached copy of a (nested) state dict, so later steps do not change it."""
    return {k: snapshot(v) if isinstance(v, dict) else v.detach().clone() for k, v in state.items()}


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
class Loop:
    """What differs between trainers; ``train`` does the rest."""

    name: str  # in messages, e.g. "local subdomain 3"
    epochs: int
    batches: Callable[[int], list]  # epoch -> minibatches (arrays of sample rows), the same on every worker
    step: Callable  # (epoch, step, rows) -> (summed loss of this worker's rows (tensor), correct (tensor), rows)
    evaluate: Callable[[], float]  # validation accuracy, the same on every worker
    weights: Callable[[], dict]  # the current weights (nested state dicts)
    load_weights: Callable[[dict], None]
    optimizer: object
    scheduler: object
    set_train: Callable[[bool], None]
    checkpoint: str | None = None
    writer: bool = True  # this worker writes the checkpoint
    reduce: Callable | None = None  # np.ndarray -> its sum over the data-parallel workers
    end_epoch: Callable[[], None] | None = None  # e.g. average BatchNorm buffers over replicas
    stop: Callable[[], bool] | None = None  # polled before every step (preemption)
    on_epoch: Callable[[dict], None] | None = None
    on_resume: Callable[[TrainState], None] | None = None
    on_step: Callable[[int, int, int, int], None] | None = None  # (epoch, step, steps, minibatch rows): progress
    agree: Callable[[list], tuple | None] | None = None  # per-rank checkpoints: (epoch, step) every rank holds
    event_extra: Callable[[], dict] | None = None  # more fields for each epoch's event (e.g. communication time)
    check_every: int = 1  # steps between finiteness checks (a GPU sync each)
    workers: object = None  # data-parallel Group whose workers each hold part of a mid-epoch state
    worker_state: Callable[[], dict] | None = None  # what one worker holds alone (e.g. its BatchNorm buffers)
    load_worker_state: Callable[[dict], None] | None = None


def _data_parallel(loop: Loop) -> bool:
    return loop.workers is not None and loop.workers.size > 1


def _save(loop: Loop, state: TrainState) -> None:
    """With per-rank checkpoints (``agree``) the previous one is kept as ``.prev`` until the next is
    complete, so a rank killed while writing leaves a point that every rank still holds.

    Mid-epoch (a preemption) the data-parallel workers differ in their own accumulators and
    BatchNorm statistics: the writer saves every worker's (a collective), so the resumed epoch ends
    exactly as the uninterrupted one."""
    if not loop.checkpoint:
        return
    workers = None
    if _data_parallel(loop) and state.partial is not None:
        mine = dict(loop.worker_state() if loop.worker_state is not None else {}, partial=state.partial)
        workers = loop.workers.gather_obj(mine)
    if loop.writer:
        if loop.agree is not None and os.path.exists(loop.checkpoint):
            os.replace(loop.checkpoint, loop.checkpoint + ".prev")
        saved = {"optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
                 "rng": rng_state(), "weights": loop.weights(), "state": state.state_dict()}
        if workers is not None:
            saved["workers"] = workers
        checkpoint.save(saved, loop.checkpoint)


def _load_worker(loop: Loop, saved: dict, state: TrainState) -> None:
    """This worker's part of a mid-epoch data-parallel checkpoint."""
    workers = saved.get("workers")
    if workers is None or not _data_parallel(loop):
        return
    if len(workers) != loop.workers.size:
        raise UserError(f"{loop.checkpoint}: stopped mid-epoch with {len(workers)} data-parallel workers for "
                        f"{loop.name}, now {loop.workers.size}; resume with the ranks the run had")
    mine = workers[loop.workers.rank]
    state.partial = mine["partial"]
    if loop.load_worker_state is not None:
        loop.load_worker_state(mine)


def resume(loop: Loop, device) -> TrainState | None:
    """The training state of ``loop.checkpoint`` loaded into the loop's models and optimizer, if any."""
    if not loop.checkpoint:
        return None
    files = [p for p in (loop.checkpoint, loop.checkpoint + ".prev") if os.path.exists(p)]
    if loop.agree is None:
        files = files[:1] if loop.checkpoint in files else []
    held = {}
    for path in files:
        try:
            saved = checkpoint.load(path, map_location=device)
        except UserError:
            if loop.agree is None:
                raise
            continue  # a torn per-rank checkpoint is a point this rank does not hold
        held.setdefault((int(saved["state"]["epoch"]), int(saved["state"]["step"])), saved)
    point = max(held) if loop.agree is None and held else None
    if loop.agree is not None:
        point = loop.agree(sorted(held))  # collective: the newest point every rank holds, or None
    if point is None:
        return None
    saved = held[point]
    loop.optimizer.load_state_dict(saved["optimizer"])
    loop.scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    loop.load_weights(saved["weights"])
    state = TrainState()
    state.load_state_dict(saved["state"])
    _load_worker(loop, saved, state)
    if loop.on_resume is not None:
        loop.on_resume(state)
    return state


def train(loop: Loop, state: TrainState, device) -> TrainState:
    """Run the remaining epochs of ``state``; raise ``Preempted`` after checkpointing on a stop."""
    from .preemption import Preempted

    if state.best is None:
        state.best = snapshot(loop.weights())
    for epoch in range(state.epoch, loop.epochs):
        loop.set_train(True)
        batches = loop.batches(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen, done_seconds, first = 0, 0.0, 0
        if state.partial is not None:
            p = state.partial
            loss_sum, correct = p["loss_sum"].to(device), p["correct"].to(device)
            seen, done_seconds, first = int(p["seen"]), float(p["seconds"]), state.step
            state.partial, state.step = None, 0
        t0 = time.perf_counter()
        for step in range(first, len(batches)):
            if loop.stop is not None and loop.stop():
                state.epoch, state.step = epoch, step
                state.partial = {"loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "seen": seen,
                                 "seconds": done_seconds + time.perf_counter() - t0}
                _save(loop, state)
                raise Preempted()
            step_loss, step_correct, rows = loop.step(epoch, step, batches[step])
            loss_sum += step_loss.detach().double()
            correct += step_correct.detach().double()
            seen += rows
            if loop.on_step is not None:
                loop.on_step(epoch, step, len(batches), len(batches[step]))
            if (step + 1) % loop.check_every == 0 or step == len(batches) - 1:
                value = float(loss_sum)
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"{loop.name}: the training loss became {value} in epoch {epoch + 1}, by step {step + 1}; "
                        f"lower the learning rate or check the data (checkpoints of earlier epochs are kept)")
        loop.scheduler.step()
        if loop.end_epoch is not None:
            loop.end_epoch()
        seconds = done_seconds + time.perf_counter() - t0
        val = float(loop.evaluate())
        stats = np.array([float(loss_sum), float(correct), seen], dtype=np.float64)
        if loop.reduce is not None:
            stats = loop.reduce(stats)
        event = {"epoch": epoch + 1, "epochs": loop.epochs, "loss": float(stats[0] / max(stats[2], 1)),
                 "train_acc": float(stats[1] / max(stats[2], 1)), "val_acc": val, "seconds": seconds,
                 "images_per_s": float(stats[2] / max(seconds, 1e-9)),
                 "lr": float(loop.optimizer.param_groups[0]["lr"])}
        if loop.event_extra is not None:
            event.update(loop.event_extra())
        state.history.append(event)
        state.seconds += seconds
        state.images += int(stats[2])
        state.epoch = epoch + 1
        if val > state.best_val:
            state.best_val, state.best_epoch, state.best = val, epoch + 1, snapshot(loop.weights())
        _save(loop, state)
        if loop.on_epoch is not None:
            loop.on_epoch(event)
    return state


def run_loop(loop: Loop, device, start: Callable[[], TrainState] | None = None) -> TrainState:
    """Resume from the loop's checkpoint, or begin at ``start()`` (default: a fresh state)."""
    state = resume(loop, device)
    if state is None:
        state = start() if start is not None else TrainState()
    return train(loop, state, device)
