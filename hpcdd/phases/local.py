"""Local phase: every rank trains the local CNNs of its subdomains, one after another, independently.

No communication but the stop poll (replicas of a subdomain are data-parallel in their group) and
one gather of the summaries at the end, which rank 0 writes to ``RUN/local/result.json``.
"""

from __future__ import annotations

import os
import time

from .. import checkpoint
from ..models import count_parameters
from ..rng import stream_of
from ..training import Fit, fit


def run(ctx) -> None:
    own, layout = ctx.world.own, ctx.layout
    os.makedirs(layout.phase_dir("local"), exist_ok=True)
    t0 = time.perf_counter()
    summaries = []
    for n_done, i in enumerate(own.subdomains):
        final = layout.local_model(i)
        if os.path.exists(final):
            summaries.append(checkpoint.load(final)["summary"])
            continue
        model = ctx.models.local(i)
        ckpt = layout.local_checkpoint(i)
        state = fit(model, Fit(
            name=f"local subdomain {i}", train=ctx.data(i, "train"), val=ctx.data(i, "val"), t=ctx.cfg.local,
            stream=stream_of(ctx.cfg.seed, "local", i), device=ctx.device, eval_batch=ctx.cfg.eval_batch_size,
            group=ctx.world.replicas, checkpoint=ckpt, writer=own.replica == 0,
            on_epoch=ctx.epoch_logger("local", f"subdomain {i}"),
            on_resume=ctx.resume_logger("local", write_event=False, subdomain=i), stop=ctx.stop_independent(),
            on_step=ctx.training(f"subdomain {i}", ctx.cfg.local.epochs, {i: model},
                                 left=len(own.subdomains) - n_done - 1, share=1 / own.replicas)))
        ctx.progress.end_training()
        summary = {"subdomain": i, "best_val": state.best_val, "best_epoch": state.best_epoch,
                   "train_seconds": state.seconds, "images": state.images, "parameters": count_parameters(model),
                   "history": state.history, "resumes": state.extra.get("resumes", [])}
        if own.replica == 0:
            checkpoint.save({"model": state.best["model"], "summary": summary, "subdomain": i}, final)
            if os.path.exists(ckpt):
                os.unlink(ckpt)
        summaries.append(summary)
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
        checkpoint.write_json({"subdomains": [{k: v for k, v in s.items() if k != "history"} for s in subs],
                               "wall_seconds": max(walls), "rank_seconds": walls}, layout.result("local"))
    ctx.mark_done("local")
