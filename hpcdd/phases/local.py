"""Local phase: every rank trains the local CNNs of its subdomains independently: one after another,
or, where several share a subimage shape, together as one fused model (hpcdd/fused.py,
``performance.fuse_local``).

No communication but the stop poll (replicas of a subdomain are data-parallel in their group) and
one gather of the summaries at the end, which rank 0 writes to ``RUN/local/result.json``.
"""

from __future__ import annotations

import os
import time

from .. import checkpoint
from ..data import MemberData
from ..errors import UserError
from ..fused import fusable
from ..models import count_parameters
from ..rng import stream_of
from ..training import Fit, fit


# Fused training pays where per-operator overhead dominates: narrow local CNNs. Measured on the 2-core
# CPU (1 thread, batch 128, a step fused against the members one after another): VGG widths 8..32 on
# 9x9 subimages 1.4x (2 members) and 1.75x (4), 11x11 1.3x (2), 15x15 1.03x (4); widths 11..45 on 9x9
# 1.25x (2); widths 16..64 on 15x15 1.0x (2) and 0.84x (4); ResNet-18 layout widths 4..32 on 32x36 1.7x (2).
FUSE_MAX_WIDTH = 48


def fuses(setting: str, device, replicas: int, model) -> bool:
    """Whether local CNNs of one shape train fused: "on", or "auto" on the CPU for CNNs whose widest
    convolution has at most FUSE_MAX_WIDTH channels (not yet measured on a GPU); never with replicas
    (a rank then owns one subdomain)."""
    if setting == "off" or replicas > 1 or not fusable(model):
        return False
    widest = max((m.out_channels for m in model.modules() if hasattr(m, "out_channels")), default=0)
    return setting == "on" or (str(device) == "cpu" and widest <= FUSE_MAX_WIDTH)


def _points(path: str) -> set:
    """The (epoch, step) points a local checkpoint and its ``.prev`` (kept by fused trainings) hold;
    without either, the start (0, 0), where a fused training writes its first checkpoints."""
    if not os.path.exists(path) and not os.path.exists(path + ".prev"):
        return {(0, 0)}
    points = set()
    for f in (path, path + ".prev"):
        if os.path.exists(f):
            try:
                state = checkpoint.load(f)["state"]
                points.add((int(state["epoch"]), int(state["step"])))
            except (UserError, KeyError):
                points.add(f)  # unreadable: never common, so trained alone, where resuming reports it
    return points


def fused_groups(ctx, subdomains: list) -> list:
    """``subdomains`` as groups that run as one fused model (same subimage shape), or one by one
    where ``performance.fuse_local`` says not to fuse."""
    return shape_groups(ctx.models, subdomains, ctx.cfg.performance.fuse_local, ctx.device, ctx.world.own.replicas)


def shape_groups(models, subdomains: list, setting: str, device, replicas: int = 1) -> list:
    """``fused_groups`` without a run: ``models`` a ``factory.Models`` (benchmarks time these groups)."""
    if len(subdomains) < 2 or not fuses(setting, device, replicas, models.plain_local(subdomains[0])):
        return [[i] for i in subdomains]
    groups: dict = {}
    for i in subdomains:
        groups.setdefault(models.manifest.subimage_shape(i), []).append(i)
    return sorted(groups.values())


def training_groups(ctx, subdomains: list) -> list:
    """The subdomains to train, as groups trained together: same subimage shape and a point every
    member holds (the start, when none has a checkpoint; the engine resumes from the newest)."""
    groups = []
    for group in fused_groups(ctx, subdomains):
        held = [_points(ctx.layout.local_checkpoint(i)) for i in group]
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

    def each(make):
        hooks = [make(i) for i in group]
        return hooks[0] if alone else hooks

    def data(split):
        flip = split == "train" and cfg.local.augment_flip
        parts = [ctx.data(i, split, mirrored=flip) for i in group]
        return parts[0] if alone else MemberData(parts)

    flops_of = {group[0]: model} if alone else {i: ctx.models.plain_local(i) for i in group}
    states = fit(model, Fit(
        name=f"local {label}", train=data("train"), val=data("val"), t=cfg.local, stream=streams[0],
        device=ctx.device, eval_batch=cfg.eval_batch_size, group=ctx.world.replicas,
        checkpoint=each(layout.local_checkpoint), writer=own.replica == 0,
        on_epoch=each(lambda i: ctx.epoch_logger("local", f"subdomain {i}")),
        on_resume=each(lambda i: ctx.resume_logger("local", write_event=False, subdomain=i)),
        stop=ctx.stop_independent(),
        on_step=ctx.training(label, cfg.local.epochs, flops_of, left=left, share=1 / own.replicas)))
    ctx.progress.end_training()
    states = [states] if alone else states
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
            checkpoint.save({"model": state.best["model"], "summary": summary, "subdomain": i}, layout.local_model(i))
            for path in (layout.local_checkpoint(i), layout.local_checkpoint(i) + ".prev"):
                if os.path.exists(path):
                    os.unlink(path)
        summaries.append(summary)
    return summaries


def run(ctx) -> None:
    own, layout = ctx.world.own, ctx.layout
    os.makedirs(layout.phase_dir("local"), exist_ok=True)
    t0 = time.perf_counter()
    summaries, todo = [], []
    for i in own.subdomains:
        if os.path.exists(layout.local_model(i)):
            summaries.append(checkpoint.load(layout.local_model(i))["summary"])
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
        checkpoint.write_json({"subdomains": [{k: v for k, v in s.items() if k != "history"} for s in subs],
                               "wall_seconds": max(walls), "rank_seconds": walls}, layout.result("local"))
    ctx.mark_done("local")
