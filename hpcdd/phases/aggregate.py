"""Aggregate phase: the coarse problem. Local outputs (n, N, K) are gathered at rank 0 (Gatherv),
which trains the DNN on them and scores it against average probability and majority vote; the DNN
weights are then broadcast (Bcast) to every rank. The DNN needs only the train and val outputs, so the
other ranks compute their test outputs while rank 0 trains it (unless the node has more ranks than cores).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from .. import atomic
from ..aggregators import accuracy, average, vote
from ..coherent import dnn_view
from ..data import TensorData
from ..manifest import SPLITS
from ..metrics import scores
from ..models import count_parameters
from ..parallel.collectives import bcast_array
from ..parallel.launcher import oversubscribed
from ..parallel.preemption import Preempted
from ..table import SCORES, row
from ..training.engine import TrainingCheckpoint
from ..training.fit import Fit, fit, group_logits
from ..training.rng import stream_of


def local_logits(ctx, groups: dict, split: str) -> np.ndarray:
    """(owned subdomains, n, K) logits of this rank's local CNNs (``RunContext.local_groups``) on a split."""
    out = group_logits(groups, {i: ctx.data(i, split) for i in ctx.world.own.subdomains}, ctx.device,
                       ctx.cfg.eval_batch_size)
    return np.stack([out[i] for i in ctx.world.own.subdomains])


def on_root(ctx, work, meanwhile=None):
    """``work()`` on rank 0 while the other ranks run ``meanwhile()`` (if given) and then wait without
    spinning; a stop on any rank during it stops every rank (rank 0 checkpoints first). Returns rank
    0's result there, ``meanwhile()``'s elsewhere."""
    result, stopped = None, False
    if ctx.world.is_root:
        try:
            result = work()
        except Preempted:
            stopped = True
    elif meanwhile is not None:
        result = meanwhile()
    forward = None if ctx.world.is_root or ctx.stop is None else ctx.stop.poll_independent  # a signal here reaches rank 0
    ctx.world.everyone.idle_barrier(while_waiting=forward)
    if ctx.world.bcast_obj(stopped):
        raise Preempted()
    return result


# The DNN's epochs are short (tens of ms on Fashion-MNIST's 54,000 samples): a checkpoint after each cost
# about as much as the epoch. Every 10 s at most, the first and last epochs and a stop always: a kill
# loses at most 10 s, and the resumed DNN replays the epochs since bit for bit (counter-based streams).
DNN_CHECKPOINT_SECONDS = 10.0


def train_dnn(ctx, feats: dict, labels: dict):
    """Rank 0: the DNN trained by the engine on the local outputs, selected on validation."""
    model = ctx.models.dnn()
    every = max(1, ctx.cfg.dnn.epochs // 10)

    def on_epoch(e):
        ctx.event(phase="aggregate", model="dnn", **e)
        if e["epoch"] % every == 0 or e["epoch"] == e["epochs"]:
            ctx.log(f"[aggregate] DNN epoch {e['epoch']}/{e['epochs']}: loss {e['loss']:.4f} train {e['train_acc']:.4f} "
                    f"val {e['val_acc']:.4f}")

    state, = fit(model, Fit(
        name="DNN", train=TensorData(feats["train"].to(ctx.device), labels["train"]),
        val=TensorData(feats["val"].to(ctx.device), labels["val"]), t=ctx.cfg.dnn,
        stream=stream_of(ctx.cfg.seed, "dnn"), device=ctx.device, eval_batch=ctx.cfg.eval_batch_size,
        checkpoint=[ctx.layout.dnn_checkpoint], checkpoint_interval=DNN_CHECKPOINT_SECONDS, on_epoch=[on_epoch],
        on_resume=[ctx.resume_logger("aggregate", model="dnn")],
        stop=ctx.stop_alone(), on_step=ctx.training("DNN", ctx.cfg.dnn.epochs, {})))
    ctx.progress.end_training()
    return state.best["model"], {"best_val": state.best_val, "best_epoch": state.best_epoch,
                                 "train_seconds": state.seconds, "parameters": count_parameters(model)}


def run(ctx) -> None:
    t0 = time.perf_counter()
    layout, m = ctx.layout, ctx.manifest
    os.makedirs(layout.phase_dir("aggregate"), exist_ok=True)
    # inference copies, BatchNorm folded
    models = {g: ctx.models.inference(m) for g, m in ctx.local_groups(layout.local_model).items()}
    logits, seconds = {}, {"inference": {}, "gather": {}}

    def infer(split):
        t = time.perf_counter()
        out = local_logits(ctx, models, split) if ctx.world.own.replica == 0 else None
        seconds["inference"][split] = time.perf_counter() - t  # replicas other than the first compute nothing
        return out

    def gathered(split, ready=None):
        t1 = time.perf_counter()
        full = ctx.gather_at_root(split, (lambda: ready) if ready is not None else lambda: infer(split))
        wall = time.perf_counter() - t1
        mine = seconds["inference"].get(split, 0.0)
        seconds["gather"][split] = wall - (mine if ready is None else 0.0)
        ctx.log(f"[aggregate] outputs of the {m.n} local CNNs on the {split} split ({m.count(split)} samples) "
                f"gathered in {wall:.1f} s (rank 0's inference {mine:.1f} s)")
        return full

    for split in ("train", "val"):
        logits[split] = gathered(split)
    kind = ctx.cfg.dnn.input
    if ctx.world.is_root:
        labels = {s: ctx.labels(s) for s in SPLITS}
        feats = {s: dnn_view(torch.from_numpy(logits[s]), kind) for s in ("train", "val")}
    # the DNN needs only train and val: the other ranks compute their test outputs meanwhile, rank 0
    # after it; with more ranks than cores that only slows the DNN, so then every rank computes them first
    overlap = str(ctx.device) != "cpu" or not oversubscribed(ctx.world.info)
    ready = None if overlap else infer("test")
    t_dnn = time.perf_counter()
    early = on_root(ctx, lambda: train_dnn(ctx, feats, labels), meanwhile=(lambda: infer("test")) if overlap else None)
    trained = early if ctx.world.is_root else None
    seconds["dnn"] = time.perf_counter() - t_dnn
    logits["test"] = gathered("test", early if overlap and not ctx.world.is_root else ready)
    if ctx.world.is_root:
        feats["test"] = dnn_view(torch.from_numpy(logits["test"]), kind)
    dnn = ctx.models.dnn()
    flat = bcast_array(ctx.world.comm, None if trained is None else flatten_state(trained[0]))
    dnn.load_state_dict(unflatten_state(dnn.state_dict(), flat))
    if ctx.world.is_root:
        info = trained[1]
        dnn.eval()
        results = {"methods": {}, "local": [{"subdomain": i} for i in range(m.n)]}

        def record(entry: dict, split: str, pred, y, p) -> None:
            """Accuracy on every split; on test also the scores for imbalanced classes (``metrics``)."""
            entry[split] = accuracy(pred, y)
            if split == "test":
                entry.update(scores(pred, y, m.k, p[:, -1]))

        for s in SPLITS:
            probs = torch.softmax(torch.from_numpy(logits[s]), dim=-1).numpy()
            y = labels[s].numpy()
            atomic.save_npz(layout.probs(s), probs=probs, logits=logits[s], y=y)
            with torch.no_grad():
                out = dnn(feats[s].to(ctx.device))
            pred_dnn, p_dnn = out.argmax(1).cpu().numpy(), torch.softmax(out, -1).cpu().numpy()
            votes = np.stack([(probs.argmax(2) == c).mean(1) for c in range(m.k)], 1)  # a vote's share per class
            for name, pred, p in (("dnn", pred_dnn, p_dnn), ("average", average(probs), probs.mean(1)),
                                  ("vote", vote(probs), votes)):
                record(results["methods"].setdefault(name, {}), s, pred, y, p)
            for i in range(m.n):
                record(results["local"][i], s, probs[:, i].argmax(1), y, probs[:, i])
        results["test_class_counts"] = np.bincount(labels["test"].numpy(), minlength=m.k).tolist()
        results["dnn"] = info
        results["wall_seconds"] = time.perf_counter() - t0  # the whole phase; the DNN's own: seconds["dnn"]
        # where the phase's time goes (rank 0): the local CNNs' inference per split, waiting for the
        # other ranks' outputs, the DNN's training while the other ranks wait, the rest
        seconds["total"] = results["wall_seconds"]
        seconds["other"] = seconds["total"] - sum(seconds["inference"].values()) - sum(seconds["gather"].values()) \
            - seconds["dnn"]
        results["seconds"] = seconds
        ctx.log(f"[aggregate] {seconds['total']:.1f} s: inference {sum(seconds['inference'].values()):.1f} s, "
                f"waiting for other ranks {sum(seconds['gather'].values()):.1f} s, DNN training {seconds['dnn']:.1f} s "
                f"(other ranks idle), rest {seconds['other']:.1f} s")
        atomic.save({"model": dnn.state_dict(), "input": kind, "hidden": list(ctx.cfg.dnn.hidden),
                         "info": info}, layout.dnn)
        atomic.write_json(results, layout.result("aggregate"))
        TrainingCheckpoint(layout.dnn_checkpoint).discard()
        r = results
        ctx.log(f"[aggregate] test accuracy: dnn {r['methods']['dnn']['test']:.4f}, average "
                f"{r['methods']['average']['test']:.4f}, vote {r['methods']['vote']['test']:.4f}; local CNNs "
                f"{min(x['test'] for x in r['local']):.4f}..{max(x['test'] for x in r['local']):.4f}")
    ctx.sync()
    ctx.mark_done("aggregate")


def rows(results) -> list:
    """The report's rows of this phase: the local CNNs (scored here, on every split), average, vote
    and the CNN-DNN, all at the cost of local + aggregate."""
    agg, local = results.of("aggregate"), results.of("local")
    if not agg or not local:
        return []

    def spread(values):
        return [min(values), float(np.mean(values)), max(values)] if None not in values else None

    each = agg["local"]
    scored = {k: spread([r.get(k) for r in each]) for k in SCORES if k in each[0]}
    meth, params, wall = agg["methods"], results.local_parameters, results.decomposed_seconds
    return [
        row("local", "local CNNs (min / mean / max)", spread([r["val"] for r in each]),
            spread([r["test"] for r in each]), [s["parameters"] for s in local["subdomains"]], local["wall_seconds"],
            results.cfg.local.epochs, scored),
        row("average", "average probability", meth["average"]["val"], meth["average"]["test"], params, wall,
            scored=meth["average"]),
        row("vote", "majority vote", meth["vote"]["val"], meth["vote"]["test"], params, wall, scored=meth["vote"]),
        row("dnn", "CNN-DNN", meth["dnn"]["val"], meth["dnn"]["test"], results.cnn_dnn_parameters, wall,
            scored=meth["dnn"], cnn_dnn=["aggregate"], aggregate_seconds=results.aggregate_seconds,
            dnn_seconds=agg.get("seconds", {}).get("dnn")),
    ]


def flatten_state(state: dict) -> np.ndarray:
    return np.concatenate([v.detach().cpu().float().reshape(-1).numpy() for v in state.values()])


def unflatten_state(template: dict, flat: np.ndarray) -> dict:
    out, offset = {}, 0
    for k, v in template.items():
        out[k] = torch.from_numpy(flat[offset:offset + v.numel()].copy()).view_as(v).to(v.dtype)
        offset += v.numel()
    return out
