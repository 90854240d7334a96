"""Coherent phase: the whole CNN-DNN trained end to end, model-parallel, once per strategy.

``scratch`` starts from the local-phase and DNN initialisations, ``transfer`` from the trained
local CNNs and DNN. Per step every rank runs its own local CNNs on the same minibatch, the (B, K)
outputs are Allgathered, the small DNN runs replicated, and each rank backpropagates into its own
local CNNs (``hpcdd.coherent.DistributedCoherent``). Each rank checkpoints its own share.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from .. import atomic
from ..aggregators import accuracy
from ..augmentation import augmentation
from ..coherent import DistributedCoherent
from ..errors import UserError
from ..metrics import scores
from ..parallel.ownership import slice_rows
from ..table import row
from ..training.engine import (Checkpoints, Hooks, Loop, Trained, TrainingCheckpoint, TrainState, make_optimizer,
                               make_scheduler, run_loop, snapshot)
from ..training.fit import buffers_of
from ..training.rng import stream_of


def coherent_accuracy(ctx, model: DistributedCoherent, split: str, more: bool = False):
    """Accuracy of the coherent model on a split: outputs gathered at rank 0, the DNN there. ``more``:
    (accuracy, the metrics of hpcdd.metrics.scores) instead."""
    n = ctx.manifest.count(split)
    full = ctx.gather_at_root(split, lambda: model.local_outputs(
        {i: ctx.data(i, split) for i in ctx.world.own.subdomains}, np.arange(n), ctx.device, ctx.cfg.eval_batch_size))
    acc = None
    if ctx.world.is_root:
        z = torch.from_numpy(full).to(ctx.device)
        model.dnn.eval()
        with torch.no_grad():
            out = model.dnn(z)
        model.dnn.train()
        pred, y = out.argmax(1).cpu().numpy(), ctx.labels(split).numpy()
        acc = accuracy(pred, y)
        if more:
            acc = (acc, scores(pred, y, ctx.manifest.k, torch.softmax(out, -1)[:, -1].cpu().numpy()))
    out = ctx.world.bcast_obj(acc)
    return (float(out[0]), out[1]) if more else float(out)


def common_point(world, points: list) -> tuple | None:
    """The newest (epoch, step) checkpoint every rank holds (None: start afresh on every rank)."""
    held = [set(map(tuple, p)) for p in world.allgather_obj([list(p) for p in points])]
    common = set.intersection(*held) if held else set()
    return max(common) if common else None


def weights_of(model: DistributedCoherent) -> dict:
    return {"local": model.local_state_dicts(), "dnn": model.dnn.state_dict(), "groups": [list(g) for g in model.groups]}


def load_weights(model: DistributedCoherent, weights: dict) -> None:
    model.load_local_state_dicts(weights["local"])
    model.dnn.load_state_dict(weights["dnn"])


def check_groups(path: str, model: DistributedCoherent) -> None:
    """A checkpoint's optimizer state has the layout of the fused groups it was written with: a
    resume that fuses differently (``performance.fuse_local = "auto"`` on another kind of device)
    gets one line instead of torch's shape error."""
    groups = [list(g) for g in model.groups]
    for f, weights in TrainingCheckpoint(path).weights():
        saved = weights.get("groups", groups) if isinstance(weights, dict) else groups
        if saved != groups:
            raise UserError(f"{f}: written with this rank's local CNNs trained as {saved}, this run trains "
                            f"them as {groups} (performance.fuse_local decides by device); resume on the same "
                            f"kind of device")


def build_coherent(ctx, strategy: str) -> DistributedCoherent:
    """scratch: the local-phase and DNN initialisations; transfer: the trained local CNNs and DNN."""
    dnn = ctx.models.dnn()
    if strategy == "transfer":
        groups = ctx.local_groups(ctx.layout.local_model)
        dnn.load_state_dict(atomic.load(ctx.layout.dnn)["model"])
    else:
        groups = ctx.local_groups()
    return DistributedCoherent(ctx.world, groups, dnn, ctx.manifest.n, ctx.cfg.dnn.input)


def train_coherent(ctx, strategy: str, t) -> None:
    own, world, layout, device = ctx.world.own, ctx.world, ctx.layout, ctx.device
    os.makedirs(layout.phase_dir("coherent", strategy), exist_ok=True)
    model = build_coherent(ctx, strategy)
    opt = make_optimizer(list(model.parameters()), t)
    train = {i: ctx.data(i, "train", mirrored=t.augment_flip) for i in own.subdomains}
    first = train[own.subdomains[0]]
    stream = stream_of(ctx.cfg.seed, f"coherent {strategy}")
    epoch_aug = {}

    def batches(epoch):
        model.comm_time, model.comm_bytes, model.comm_steps = 0.0, 0, 0
        epoch_aug.clear()
        epoch_aug[epoch] = augmentation(stream, epoch, first.ids, t, ctx.manifest.dims)
        batches = stream.batches(epoch, len(first), t.batch_size, first.plan)
        if batches:
            order = np.concatenate(batches)  # one array: a mirror another subdomain scheduled keeps its windows
            for data in train.values():
                data.schedule(order)
        return batches

    def step(epoch, step, rows):
        part = rows[slice_rows(len(rows), own.replicas, own.replica)]
        aug = epoch_aug[epoch]
        xs = {i: train[i].batch(part, None if aug is None else aug[part])[0].to(device, non_blocking=True)
              for i in own.subdomains}
        y = first.y[torch.from_numpy(rows)].to(device)
        loss, out = model.step(xs, y, len(rows), opt, stream.step_counters(epoch, step))
        return loss * len(rows), (out.argmax(1) == y).sum(), len(rows)

    def start():
        # the starting point is a candidate too: transfer never ends below where it began
        initial = coherent_accuracy(ctx, model, "val")
        return [TrainState(best=snapshot(weights_of(model)), best_val=initial, extra={"initial_val": initial})]

    def on_epoch(event):
        ctx.event(phase="coherent", strategy=strategy, **event)
        ctx.log(f"[coherent {strategy}] epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f} "
                f"train {event['train_acc']:.4f} val {event['val_acc']:.4f} ({event['seconds']:.1f} s, "
                f"communication {event['comm_seconds']:.1f} s)")

    ckpt = layout.coherent_checkpoint(strategy, world.rank)
    trained = Trained(weights=lambda: [weights_of(model)], load_weights=lambda w: load_weights(model, w[0]), optimizer=opt,
                      scheduler=make_scheduler(opt, t), set_train=model.train)
    hooks = Hooks(
        stop=ctx.stop_collective(), on_epoch=[on_epoch], on_resume=[ctx.resume_logger("coherent", strategy=strategy)],
        on_step=ctx.training(f"coherent {strategy}", t.epochs, {i: ctx.models.plain_local(i) for i in own.subdomains}
                             if world.is_root else {}, share=1 / own.replicas),
        end_epoch=(lambda: world.replicas.mean_([b for m in model.local_modules() for b in buffers_of(m)]))
        if own.replicas > 1 else None,
        event_extra=lambda: {"comm_seconds": model.comm_time,
                             "comm_bytes_per_step": model.comm_bytes / max(model.comm_steps, 1)})
    loop = Loop(name=f"coherent {strategy}", epochs=t.epochs, batches=batches, step=step,
                evaluate=lambda: coherent_accuracy(ctx, model, "val"), trained=trained, hooks=hooks,
                checkpoints=Checkpoints([ckpt], agree=lambda points: common_point(world, points)),
                check_every=1 if str(device) == "cpu" else 25)
    world.checked(lambda: check_groups(ckpt, model))
    state, = run_loop(loop, device, start)
    ctx.progress.end_training()
    load_weights(model, state.best)
    test, test_scores = coherent_accuracy(ctx, model, "test", more=True)
    if own.replica == 0:
        for i, weights in model.local_state_dicts().items():
            atomic.save({"model": weights, "subdomain": i}, layout.coherent_local(strategy, i))
    if world.is_root:
        atomic.save({"model": model.dnn.state_dict(), "input": ctx.cfg.dnn.input,
                         "hidden": list(ctx.cfg.dnn.hidden)}, layout.coherent_dnn(strategy))
        atomic.write_json({"strategy": strategy, "val": state.best_val, "test": test, **test_scores,
                               "best_epoch": state.best_epoch,
                               "initial_val": state.extra["initial_val"], "train_seconds": state.seconds,
                               "comm_seconds": sum(e["comm_seconds"] for e in state.history), "epochs": t.epochs,
                               "comm_bytes_per_step": state.history[-1]["comm_bytes_per_step"] if state.history else 0,
                               "resumes": state.extra.get("resumes", []), "history": state.history},
                              layout.result("coherent", strategy))
        ctx.log(f"[coherent {strategy}] best val {state.best_val:.4f} (epoch {state.best_epoch}), test {test:.4f}")
    ctx.sync()
    TrainingCheckpoint(ckpt).discard()


def run(ctx) -> None:
    for strategy in ctx.cfg.coherent.strategies:
        key = f"coherent_{strategy}"
        if ctx.state.done(key):
            continue
        t0 = time.perf_counter()
        train_coherent(ctx, strategy, getattr(ctx.cfg.coherent, strategy))
        ctx.mark_done(key, wall_seconds=time.perf_counter() - t0)
    ctx.mark_done("coherent")


def rows(results) -> list:
    """The report's row of each coherent strategy: its own phase's time (transfer starts from the
    trained local CNNs and DNN)."""
    out = []
    for strategy in results.cfg.coherent.strategies:
        res = results.of("coherent", strategy)
        if res:
            out.append(row(f"coherent_{strategy}", f"coherent CNN-DNN ({strategy})", res["val"], res["test"],
                           results.cnn_dnn_parameters, res["train_seconds"], res["epochs"], res,
                           cnn_dnn=["coherent", strategy], comm_seconds=res["comm_seconds"],
                           initial_val=res["initial_val"], best_epoch=res["best_epoch"]))
    return out
