"""Local phase: every rank trains the local CNNs of its subdomains independently: one after another,
or, where several share a subimage shape, together as one fused model (hpcdd/fused.py,
``performance.fuse_local``).

No communication but the stop poll (replicas of a subdomain are data-parallel in their group) and
one gather of the summaries at the end, which rank 0 writes to ``RUN/local/result.json``.
"""

from __future__ import annotations

import os
import time

from .. import atomic
from ..data import MemberData
from ..models import count_parameters
from ..training.engine import TrainingCheckpoint
from ..training.fit import Fit, fit
from ..training.rng import stream_of


def training_groups(ctx, subdomains: list) -> list:
    """The subdomains to train, as groups trained together: same subimage shape and a point every
    member holds (the start, when none has a checkpoint; the engine resumes from the newest)."""
    groups = []
    for group in ctx.fused_groups(subdomains):
        held = [TrainingCheckpoint(ctx.layout.local_checkpoint(i)).points() for i in group]
        if len(group) == 1 or set.intersection(*held):
            groups.append(group)
        else:
            groups += [[i] for i in group]
    return groups


def train_group(ctx, group: list, left: int) -> list:
    """Train the local CNNs of ``group`` (fused when more than one); one summary per subdomain.
    ``left``: groups this rank trains after this one (for the ETA)."""
    layout, own, cfg = ctx.layout, ctx.world.own, ctx.cfg
    streams = [stream_of(cfg.seed, "local", i) for i in group]
    alone = len(group) == 1
    model = ctx.models.group(group)
    label = f"subdomain {group[0]}" if alone else "subdomains " + ", ".join(map(str, group))

    def data(split):
        flip = split == "train" and cfg.local.augment_flip
        parts = [ctx.data(i, split, mirrored=flip) for i in group]
        return parts[0] if alone else MemberData(parts)

    flops_of = {group[0]: model} if alone else {i: ctx.models.plain_local(i) for i in group}
    states = fit(model, Fit(
        name=f"local {label}", train=data("train"), val=data("val"), t=cfg.local, stream=streams[0],
        device=ctx.device, eval_batch=cfg.eval_batch_size, group=ctx.world.replicas,
        checkpoint=[layout.local_checkpoint(i) for i in group], writer=own.replica == 0,
        on_epoch=[ctx.epoch_logger("local", f"subdomain {i}") for i in group],
        on_resume=[ctx.resume_logger("local", write_event=False, subdomain=i) for i in group],
        stop=ctx.stop_independent(),
        on_step=ctx.training(label, cfg.local.epochs, flops_of, left=left, share=1 / own.replicas)))
    ctx.progress.end_training()
    summaries = []
    for i, state in zip(group, states):
        summary = {"subdomain": i, "best_val": state.best_val, "best_epoch": state.best_epoch,
                   "train_seconds": state.seconds, "images": state.images,
                   "parameters": count_parameters(model) // len(group), "history": state.history,
                   "resumes": state.extra.get("resumes", []),
                   "first_step_seconds": state.extra.get("first_step_seconds", [])}
        if not alone:
            summary["fused_with"] = group
        if own.replica == 0:
            atomic.save({"model": state.best["model"], "summary": summary, "subdomain": i}, layout.local_model(i))
            TrainingCheckpoint(layout.local_checkpoint(i)).discard()
        summaries.append(summary)
    return summaries


def run(ctx) -> None:
    own, layout = ctx.world.own, ctx.layout
    os.makedirs(layout.phase_dir("local"), exist_ok=True)
    t0 = time.perf_counter()
    summaries, todo = [], []
    for i in own.subdomains:
        if os.path.exists(layout.local_model(i)):
            summaries.append(atomic.load(layout.local_model(i))["summary"])
        else:
            todo.append(i)
    groups = training_groups(ctx, todo)
    for n, group in enumerate(groups):
        summaries += train_group(ctx, group, left=len(groups) - n - 1)
    wall = time.perf_counter() - t0
    ctx.sync()
    everything = ctx.world.allgather_obj((summaries, wall) if own.replica == 0 else ([], wall))
    if ctx.world.is_root:
        subs = sorted((s for part, _ in everything for s in part), key=lambda s: s["subdomain"])
        for s in subs:
            for point in s.get("resumes", []):
                ctx.event(event="resume", phase="local", subdomain=s["subdomain"], **point)
            for e in s["history"]:
                ctx.event(phase="local", subdomain=s["subdomain"], **e)
        walls = [w for _, w in everything]
        firsts = [f for s in subs for f in s.get("first_step_seconds", [])]
        if firsts:
            ctx.log(f"[local] first training steps {min(firsts):.2f}-{max(firsts):.2f} s{ctx.first_step_note()}")
        atomic.write_json({"subdomains": [{k: v for k, v in s.items() if k != "history"} for s in subs],
                               "wall_seconds": max(walls), "rank_seconds": walls}, layout.result("local"))
    ctx.mark_done("local")
