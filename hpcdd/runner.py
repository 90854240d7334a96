"""Validation before training, the run directory, and the phases in order.

Everything here runs the same way on every rank; errors found by any rank are agreed over MPI
(``World.agree``) so every rank stops with the same one-line message instead of some ranks
waiting in a collective.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time

from . import __version__, checkpoint
from .config import Config, dumps
from .data import SPLITS, ShardReader, load_manifest
from .errors import UserError
from .parallel import World, failure_marker
from .phases import PHASE_FUNCTIONS, Context


def _validate_data(cfg: Config, world: World) -> dict:
    manifest = load_manifest(cfg.data)
    n = len(manifest["shards"])
    own = world.set_ownership(n)
    if cfg.num_classes and cfg.num_classes != len(manifest["classes"]):
        raise UserError(f"num_classes = {cfg.num_classes} but {cfg.data} has {len(manifest['classes'])} classes")
    for split in SPLITS:
        if manifest["splits"].get(split, 0) < 1:
            raise UserError(f"{cfg.data}: the {split} split is empty; re-run data_prep")
    deep = manifest["dtype"] != "uint8"
    for i in own.subdomains:
        with ShardReader(cfg.data, i, manifest) as reader:
            reader.validate(deep=deep)
    if "global" in cfg.phases:
        if not manifest.get("full"):
            raise UserError(f"{cfg.data}: no full.h5 (prepared with --no-full); drop the global phase or re-run data_prep")
        if world.rank == 0:
            with ShardReader(cfg.data, None, manifest) as reader:
                reader.validate(deep=deep)
    for name, t in (("local", cfg.local), ("global", cfg.global_), ("coherent.scratch", cfg.coherent.scratch),
                    ("coherent.transfer", cfg.coherent.transfer)):
        if t.augment_shift > manifest["margin"]:
            raise UserError(f"{name}.augment_shift = {t.augment_shift} needs shards stored with --margin "
                            f">= {t.augment_shift}, but {cfg.data} has margin {manifest['margin']}")
    from .models import build_model

    probe = Context(cfg, world, cfg.out, manifest)
    for i in own.subdomains:
        build_model(probe.spec, manifest["image_shape"][0], [b - a for a, b in manifest["boxes"][i]],
                    len(manifest["classes"]), probe.width_scale)
    return manifest


def _needs(cfg: Config, run_dir: str, state: dict) -> None:
    """A phase that starts from earlier results needs them in this run or in this invocation."""
    done = {p for p, v in state.get("phases", {}).items() if v.get("done")} | set(cfg.phases)
    want = set(cfg.phases)
    if "aggregate" in want and "local" not in done:
        raise UserError("--phases aggregate needs the local phase: add local to --phases or resume a run that has it")
    if "coherent" in want and "transfer" in cfg.coherent.strategies and not {"local", "aggregate"} <= done:
        raise UserError("--phases coherent with strategy transfer needs the local and aggregate phases: add them to "
                        "--phases, resume a run that has them, or set coherent.strategies = [\"scratch\"]")


def _check_run_dir(cfg: Config, resume: bool, force: bool) -> dict:
    out = cfg.out
    state = {}
    if resume:
        path = os.path.join(out, "state.json")
        state = checkpoint.read_json(path) if os.path.exists(path) else {}
    elif os.path.exists(out):
        if not force:
            raise UserError(f"--out {out}: already exists; choose a new run directory, continue it with "
                            f"--resume {out}, or replace it with --force")
        if not os.path.isdir(out):
            raise UserError(f"--out {out}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"--out {out}: parent directory {parent} does not exist")
    target = out if os.path.isdir(out) else parent
    try:  # a real write: os.access says yes to root even on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".hpcdd-write-test-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write in {target} ({e.strerror})") from None
    _needs(cfg, out, state)
    return state


def checkpoint_bytes(cfg: Config, manifest: dict) -> int:
    """A generous estimate of what the checkpoints of a run need on disk."""
    from .models import ModelSpec, build_model, count_parameters

    c, *spatial = manifest["image_shape"]
    params = count_parameters(build_model(ModelSpec.of(cfg.model), c, spatial, len(manifest["classes"])))
    # local + two coherent strategies + global; each: final + checkpoint (weights, best weights, 2 Adam moments)
    return 4 * params * 4 * 2 * 4 + (64 << 20)


def check_disk(cfg: Config, manifest: dict) -> None:
    target = cfg.out if os.path.isdir(cfg.out) else os.path.dirname(os.path.abspath(cfg.out))
    need = checkpoint_bytes(cfg, manifest)
    free = shutil.disk_usage(target).free
    if free < need:
        raise UserError(f"--out {cfg.out}: {free / 1e6:.0f} MB free on its file system, but the checkpoints of this "
                        f"run need about {need / 1e6:.0f} MB; free space or choose another directory")


def check_resume(cfg: Config, manifest: dict) -> None:
    path = os.path.join(cfg.out, "config.json")
    meta = checkpoint.read_json(path).get("meta", {})
    if meta.get("prep_id") and meta["prep_id"] != manifest["prep_id"]:
        raise UserError(f"--resume {cfg.out}: the run was trained on data with prep id {meta['prep_id']} but "
                        f"{cfg.data} now has {manifest['prep_id']}; the shards were prepared again")


def prepare(cfg: Config, world: World, resume: bool = False, force: bool = False) -> Context:
    """Validate data, configuration and run directory on every rank; then rank 0 creates RUN."""
    error = None
    manifest, state = None, {}
    try:
        manifest = _validate_data(cfg, world)
        state = _check_run_dir(cfg, resume, force)
        check_disk(cfg, manifest)
        if resume:
            check_resume(cfg, manifest)
    except UserError as e:
        error = str(e)
    error = world.agree(error)
    if error:
        raise UserError(error)
    if world.is_root:
        if not resume:
            if os.path.exists(cfg.out):
                shutil.rmtree(cfg.out)
            os.makedirs(cfg.out)
            meta = {"tool": f"hpcdd {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "ranks": world.size, "threads_per_rank": world.threads, "device": str(world.device),
                    "host": platform.node(), "prep_id": manifest["prep_id"]}
            checkpoint.write_json(dict(json.loads(dumps(cfg)), meta=meta), os.path.join(cfg.out, "config.json"))
            checkpoint.write_json({"phases": {}}, os.path.join(cfg.out, "state.json"))
            state = {"phases": {}}
        elif os.path.exists(failure_marker(cfg.out)):  # the failure of the run being resumed
            os.replace(failure_marker(cfg.out), os.path.join(cfg.out, "FAILED.previous"))
    procs = world.allgather_obj({"rank": world.rank, "host": platform.node(), "pid": os.getpid(),
                                 "local_rank": world.info.local_rank, "device": str(world.device)})
    if world.is_root:  # maps the PID or host an MPI launcher names when a rank dies to its rank
        checkpoint.write_json({"ranks": procs, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                              os.path.join(cfg.out, "ranks.json"))
    world.barrier()
    from .preemption import StopFlag, parse_signals

    ctx = Context(cfg, world, cfg.out, manifest, state=state,
                  stop=StopFlag(world, parse_signals(cfg.preemption.signals)))
    own = world.own
    ctx.log(f"hpcdd {__version__}: {world.size} rank(s), {world.threads} thread(s) each, device {world.device}; "
            f"{manifest['dataset']} {'x'.join(map(str, manifest['grid']))} grid"
            + (f", {own.replicas} replicas per subdomain" if own.replicas > 1 else
               f", up to {max(len(s) for s in own.table)} subdomain(s) per rank"))
    return ctx


def run_phases(ctx: Context) -> None:
    """The configured phases in order; a preemption checkpoints, records itself and exits 75."""
    from .preemption import EXIT_PREEMPTED, Preempted, requeue_slurm_job

    ctx.state.pop("preempted", None)  # a resumed run: the next state.json written no longer says so
    for phase in ctx.cfg.phases:
        if ctx.done(phase) and phase != "report":
            ctx.log(f"[{phase}] already complete, skipped")
            continue
        t0 = time.perf_counter()
        try:
            PHASE_FUNCTIONS[phase](ctx)
        except Preempted as stop:
            if not stop.synced:
                ctx.world.idle_barrier()
                ctx.stop.agree()
            ctx.stop.drain()
            ctx.state["preempted"] = {"phase": phase, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if ctx.world.is_root:
                checkpoint.write_json(ctx.state, ctx.path("state.json"))
            ctx.log(f"[{phase}] stopped on a signal after checkpointing; continue with --resume {ctx.run_dir}")
            ctx.world.barrier()
            if ctx.cfg.preemption.requeue:
                # Finalize first: SLURM kills the job's processes on requeue, and a rank killed before
                # MPI_Finalize leaves shared-memory segments that break MPI_Init of the requeued job.
                ctx.release()
                ctx.world.finalize()
                if ctx.world.is_root:
                    time.sleep(1.0)  # let the other ranks finish exiting
                    requeue_slurm_job(ctx.log)
            raise SystemExit(EXIT_PREEMPTED)
        ctx.log(f"[{phase}] done in {time.perf_counter() - t0:.1f} s")
    ctx.stop.drain()
