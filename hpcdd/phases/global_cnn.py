"""Global phase: the baseline CNN on full images (full.h5), data-parallel over all ranks (each rank a
slice of every minibatch, one Allreduce of the gradients per step)."""

from __future__ import annotations

import os
import time

from .. import atomic
from ..models import count_parameters
from ..table import row
from ..training.engine import TrainingCheckpoint
from ..training.fit import Fit, fit, test_scores
from ..training.rng import stream_of


def run(ctx) -> None:
    world, layout = ctx.world, ctx.layout
    os.makedirs(layout.phase_dir("global"), exist_ok=True)
    t0 = time.perf_counter()
    model = ctx.models.global_()
    everyone = world.everyone
    state, = fit(model, Fit(
        name="global CNN", train=ctx.data(None, "train", mirrored=ctx.cfg.global_.augment_flip), val=ctx.data(None, "val"), t=ctx.cfg.global_,
        stream=stream_of(ctx.cfg.seed, "global"), device=ctx.device, eval_batch=ctx.cfg.eval_batch_size,
        group=everyone, checkpoint=[layout.global_checkpoint], writer=world.is_root,
        on_epoch=[ctx.epoch_logger("global", "global CNN")], on_resume=[ctx.resume_logger("global")],
        stop=ctx.stop_collective(),
        on_step=ctx.training("global CNN", ctx.cfg.global_.epochs, {None: model}, share=1 / world.size)))
    ctx.progress.end_training()
    model.load_state_dict(state.best["model"])
    more = test_scores(ctx.models.inference(model), ctx.data(None, "test"), ctx.device, ctx.cfg.eval_batch_size,
                       everyone)
    test = more.pop("test")
    if world.is_root:
        for e in state.history:
            ctx.event(phase="global", **e)
        atomic.save({"model": state.best["model"]}, layout.global_model)
        atomic.write_json({"val": state.best_val, "test": test, **more, "best_epoch": state.best_epoch,
                               "parameters": count_parameters(model), "train_seconds": state.seconds,
                               "wall_seconds": time.perf_counter() - t0, "epochs": ctx.cfg.global_.epochs,
                               "resumes": state.extra.get("resumes", []), "history": state.history,
                               "first_step_seconds": state.extra.get("first_step_seconds", [])},
                              layout.result("global"))
        first = state.extra.get("first_step_seconds", [0.0])[-1]
        ctx.log(f"[global] best val {state.best_val:.4f} (epoch {state.best_epoch}), test {test:.4f}; "
                f"first step {first:.2f} s{ctx.first_step_note()}")
    ctx.sync()
    if world.is_root:
        TrainingCheckpoint(layout.global_checkpoint).discard()
    ctx.data.release(None)
    ctx.mark_done("global")


def rows(results) -> list:
    """The report's baseline row."""
    glob = results.of("global")
    return [row("global", "global CNN", glob["val"], glob["test"], glob["parameters"], glob["wall_seconds"],
                glob["epochs"], glob, best_epoch=glob["best_epoch"])] if glob else []
