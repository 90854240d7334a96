"""Validation before training, the run directory, and the phases in order.

Everything here runs the same way on every rank; errors found by any rank are agreed over MPI
(``World.agree``) so every rank stops with the same one-line message instead of some ranks
waiting in a collective.
"""

from __future__ import annotations

import importlib
import glob
import json
import os
import platform
import re

import numpy as np
import shutil
import tempfile
import time

from . import __version__, atomic
from .config import Config
from .data import ShardReader
from .errors import UserError
from .events import decomposition_picture
from .factory import Models
from .layout import RunLayout
from .manifest import SPLITS, Manifest, load_manifest
from .models import count_parameters
from .parallel.preemption import (EXIT_PREEMPTED, Preempted, StopFlag, await_requeue_kill, parse_signals,
                                  requeue_slurm_job)
from .parallel.watchdog import Watchdog, acquire, check_unlocked
from .parallel.world import World, hosts_of
from .phases.context import RunContext, RunState
from .progress import Progress, make_plan
from .registry import BY_NAME, REGISTRY
from .training.acceleration import autocast_problem, compiler_problem, configure, wants_channels_last, wants_compile


def _validate_data(cfg: Config, world: World) -> Manifest:
    manifest = load_manifest(cfg.data)
    own = world.set_ownership(manifest.n)
    if cfg.num_classes and cfg.num_classes != manifest.k:
        raise UserError(f"num_classes = {cfg.num_classes} but {cfg.data} has {manifest.k} classes")
    for split in SPLITS:
        if manifest.count(split) < 1:
            raise UserError(f"{cfg.data}: the {split} split is empty; re-run data_prep")
    deep = manifest.dtype != "uint8"
    decomposed = tuple(t for p in REGISTRY if p.decomposed for t in p.trainings(cfg))
    flips = any(t.augment_flip for _, t in decomposed)  # the whole image's flip shows the mirror subdomains
    asymmetry = manifest.decomposition().asymmetry() if flips else None
    for name, t in decomposed:
        if t.augment_flip and asymmetry:
            raise UserError(f"{name}.augment_flip needs a grid whose boxes mirror each other left-right, but in "
                            f"{cfg.data} {asymmetry}: prepare a grid whose column count divides the width")
    read = set(own.subdomains) | ({manifest.decomposition().mirror(i) for i in own.subdomains} if flips else set())
    for i in sorted(read):
        with ShardReader(manifest, i) as reader:
            reader.validate(deep=deep)
    if "global" in cfg.phases:
        if not manifest.full:
            raise UserError(f"{cfg.data}: no full.h5 (prepared with --no-full); drop the global phase or re-run data_prep")
        if world.rank == 0:
            with ShardReader(manifest, None) as reader:
                reader.validate(deep=deep)
    for name, t in (t for p in REGISTRY for t in p.trainings(cfg)):
        if t.augment_shift > manifest.margin:
            raise UserError(f"{name}.augment_shift = {t.augment_shift} needs shards stored with --margin "
                            f">= {t.augment_shift}, but {cfg.data} has margin {manifest.margin}")
    problem = autocast_problem(world.device) if cfg.performance.autocast == "bf16" else None
    if problem:
        raise UserError(f"performance.autocast = \"bf16\": {problem}; set it to \"off\"")
    if cfg.performance.compile == "on":
        problem = compiler_problem(world.device)
        if problem:
            raise UserError(f"performance.compile = \"on\": {problem}; set it to \"auto\" or \"off\"")
    models = Models(cfg.model, cfg.dnn, manifest, cfg.seed)
    for i in own.subdomains:
        models.local(i)  # an architecture that does not fit the subimage raises a UserError here
    return manifest


def _needs(cfg: Config, state: RunState) -> None:
    """A phase that starts from earlier results needs them in this run or in this invocation."""
    done = state.completed() | set(cfg.phases)
    for name in cfg.phases:
        missing = [p for p in BY_NAME[name].needs(cfg) if p not in done]
        if missing:
            hint = (", or set coherent.strategies = [\"scratch\"]" if name == "coherent" else "")
            raise UserError(f"--phases {name} needs the {' and '.join(missing)} phase{'s' if len(missing) > 1 else ''}: "
                            f"add {'them' if len(missing) > 1 else 'it'} to --phases or resume a run that has "
                            f"{'them' if len(missing) > 1 else 'it'}{hint}")


def inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_run_dir(path: str) -> bool:
    """A directory hpcdd-run created: a config.json that hpcdd's marker says it wrote, and its state.json."""
    layout = RunLayout(path)
    try:
        with open(layout.config) as f:
            marked = str(json.load(f).get("meta", {}).get("tool", "")).startswith("hpcdd")
        with open(layout.state) as f:
            return marked and isinstance(json.load(f).get("phases", {}), dict)
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(out: str, data: str) -> None:
    """--force replaces only what hpcdd-run made (or an empty folder), never the data it reads."""
    if data and inside(data, out):
        raise UserError(f"--out {out} --force: {out} is or holds the data directory {data}; nothing was deleted, "
                        f"choose another run directory")
    if not os.listdir(out):
        return
    if not is_run_dir(out):
        raise UserError(f"--out {out} --force: not an hpcdd run directory (no config.json and state.json written by "
                        f"hpcdd-run); --force replaces only runs, nothing was deleted")
    foreign = RunLayout(out).foreign()
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--out {out} --force: {out} holds {listed}, which hpcdd-run did not write; nothing was "
                        f"deleted (move them out, or choose another run directory)")


def write_problem(folder: str) -> str | None:
    """Why a file cannot be created in ``folder`` (None if it can), found by a real write: os.access
    says yes to root even on a read-only file system."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".hpcdd-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror
    return None


def _check_run_dir(cfg: Config, resume: bool, force: bool) -> RunState:
    out = cfg.out
    layout = RunLayout(out)
    state = RunState(layout.state)
    if resume:
        if os.path.exists(layout.state):
            state = RunState.read(layout.state)
    elif os.path.exists(out):
        if not force:
            raise UserError(f"--out {out}: already exists; choose a new run directory, continue it with "
                            f"--resume {out}, or replace it with --force")
        if not os.path.isdir(out):
            raise UserError(f"--out {out}: exists and is not a directory")
        check_replaceable(out, cfg.data)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"--out {out}: parent directory {parent} does not exist")
    target = out if os.path.isdir(out) else parent
    problem = write_problem(target)
    if problem:
        raise UserError(f"--out {out}: cannot write in {target} ({problem})")
    _needs(cfg, state)
    return state


def checkpoint_bytes(cfg: Config, manifest: Manifest) -> int:
    """A generous estimate of what the checkpoints of a run need on disk."""
    params = count_parameters(Models(cfg.model, cfg.dnn, manifest, cfg.seed).global_())
    # local + two coherent strategies + global; each: final + checkpoint (weights, best weights, 2 Adam moments)
    return 4 * params * 4 * 2 * 4 + (64 << 20)


def check_disk(cfg: Config, manifest: Manifest) -> None:
    target = cfg.out if os.path.isdir(cfg.out) else os.path.dirname(os.path.abspath(cfg.out))
    need = checkpoint_bytes(cfg, manifest)
    free = shutil.disk_usage(target).free
    if free < need:
        raise UserError(f"--out {cfg.out}: {free / 1e6:.0f} MB free on its file system, but the checkpoints of this "
                        f"run need about {need / 1e6:.0f} MB; free space or choose another directory")


def check_resume(cfg: Config, manifest: Manifest, ranks: int) -> None:
    layout = RunLayout(cfg.out)
    meta = atomic.read_json(layout.config).get("meta", {})
    if meta.get("prep_id") and meta["prep_id"] != manifest.prep_id:
        raise UserError(f"--resume {cfg.out}: the run was trained on data with prep id {meta['prep_id']} but "
                        f"{cfg.data} now has {manifest.prep_id}; the shards were prepared again")
    # the coherent phase's checkpoints hold one rank's share each (written by all ranks at the same steps);
    # every other phase's are per subdomain, which any rank count can resume
    held = glob.glob(os.path.join(glob.escape(cfg.out), "coherent", "*", "rank_*.ckpt.pt*"))
    written = {int(m.group(1)) for m in (re.search(r"rank_(\d+)\.ckpt\.pt", p) for p in held) if m}
    if written and max(written) + 1 != ranks:
        raise UserError(f"--resume {cfg.out}: the run was interrupted in the coherent phase on {max(written) + 1} "
                        f"ranks, whose checkpoints (coherent/*/rank_*.ckpt.pt) hold one rank's share each; resume it "
                        f"with {max(written) + 1} ranks, not {ranks}")


def check_shared(cfg: Config, world: World, layout: RunLayout, resume: bool) -> None:
    """Collective: RUN (created by rank 0) must be visible and writable from every node; on a node-local
    path the other nodes would train into their own copy or fail at the first checkpoint."""
    if not os.path.isdir(layout.progress):
        problem = "it does not exist there"
    else:
        problem = write_problem(layout.progress)
        problem = problem and f"cannot write in it ({problem})"
    reports = world.allgather_obj((platform.node(), problem))
    bad = [r for r, (_, p) in enumerate(reports) if p]
    if not bad:
        return

    if world.is_root and not resume:
        shutil.rmtree(cfg.out, ignore_errors=True)  # it was made here a moment ago
    raise UserError(f"--out {cfg.out}: not usable from {hosts_of(bad, [h for h, _ in reports])}: {reports[bad[0]][1]}; "
                    f"RUN must be on a file system that every node mounts at the same path")


def check_data_unchanged(ctx: RunContext, phase: str) -> None:
    """Collective, at every phase start: the data directory still holds the preparation the run began on
    (``data_prep --force`` into DATA during a run replaces it whole; open files keep the old one)."""
    def check():
        try:
            now = load_manifest(ctx.cfg.data).prep_id
        except UserError as e:
            raise UserError(f"{ctx.cfg.data} changed during the run and is no longer readable ({e}); "
                            f"stopped before the {phase} phase") from None
        if now != ctx.manifest.prep_id:
            raise UserError(f"{ctx.cfg.data} was prepared again during the run (prep id {ctx.manifest.prep_id} -> "
                            f"{now}); stopped before the {phase} phase so results do not mix two preparations; "
                            f"start a new run on the new data")

    ctx.world.checked(check)


def prepare(cfg: Config, world: World, resume: bool = False, force: bool = False) -> RunContext:
    """Validate data, configuration and run directory on every rank; then rank 0 creates RUN."""
    def check():
        manifest = _validate_data(cfg, world)
        state = _check_run_dir(cfg, resume, force)
        check_disk(cfg, manifest)
        if resume:
            check_resume(cfg, manifest, world.size)
        if world.is_root and os.path.isdir(cfg.out):  # one judge: liveness on another host is a guess
            check_unlocked(RunLayout(cfg.out), f"--resume {cfg.out}" if resume else f"--out {cfg.out} --force")
        return manifest, state

    manifest, state = world.checked(check)
    layout = RunLayout(cfg.out)

    def create():
        """Rank 0 takes the run directory: created (or replaced) and locked, or locked on resume."""
        if not world.is_root:
            return
        if not resume:
            if os.path.exists(cfg.out):
                shutil.rmtree(cfg.out)
            try:
                os.makedirs(cfg.out)
            except FileExistsError:
                raise UserError(f"--out {cfg.out}: another process created it meanwhile; choose a new run "
                                f"directory") from None
        acquire(layout, f"--resume {cfg.out}" if resume else f"--out {cfg.out}")
        if not resume:
            meta = {"tool": f"hpcdd {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "ranks": world.size, "threads_per_rank": world.threads, "device": str(world.device),
                    "host": platform.node(), "prep_id": manifest.prep_id, "software": world.software}
            atomic.write_json(dict(cfg.to_dict(), meta=meta), layout.config)
            atomic.write_json(state.values, layout.state)
        elif os.path.exists(layout.failed):  # the failure of the run being resumed
            os.replace(layout.failed, layout.failed_previous)
        with open(layout.reserve, "wb") as f:
            f.write(b"\0" * 65536)
        shutil.rmtree(layout.progress, ignore_errors=True)  # counters and heartbeats of an earlier attempt
        os.makedirs(layout.progress)

    world.checked(create)
    check_shared(cfg, world, layout, resume)
    procs = world.allgather_obj({"rank": world.rank, "host": platform.node(), "pid": os.getpid(),
                                 "local_rank": world.info.local_rank, "threads": world.threads,
                                 "device": str(world.device)})
    if world.is_root:  # maps the PID or host an MPI launcher names when a rank dies to its rank
        atomic.write_json({"ranks": procs, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, layout.ranks)
    world.barrier()

    ctx = RunContext(cfg, world, layout, manifest, state, stop=StopFlag(world, parse_signals(cfg.preemption.signals)))
    ctx.watchdog = Watchdog(layout, world, cfg.watchdog_timeout, procs).start()
    # Building the first optimizer (and counting FLOPs) imports torch._dynamo: 1.4 s. Every rank pays it
    # here, while rank 0 makes the plan, not rank 0 here and the others after the next collective.
    importlib.import_module("torch._dynamo")

    plan = make_plan(cfg, manifest, ctx.models, world.own.table, world.size) if world.is_root else None
    ctx.progress = Progress(layout, world, cfg.phases, plan, cfg.log_interval)
    if world.is_root and manifest.full:
        with ShardReader(manifest, None) as reader:
            ctx.events.image("decomposition", decomposition_picture(reader.read_rows("test", np.array([0]))[0][0],
                                                                     manifest.boxes, manifest.margin))
    own = world.own
    ctx.log(f"hpcdd {__version__}: {world.size} rank(s), {world.threads} thread(s) each, device {world.device}; "
            f"{manifest.dataset} {'x'.join(map(str, manifest.grid))} grid"
            + (f", {own.replicas} replicas per subdomain" if own.replicas > 1 else
               f", up to {max(len(s) for s in own.table)} subdomain(s) per rank"))
    perf = cfg.performance
    process = configure(perf)  # every rank
    ctx.log(f"CNNs: channels_last {'on' if wants_channels_last(perf.channels_last, manifest.dims) else 'off'}, "
            f"torch.compile {wants_compile(perf.compile, world.device)[1]}; {process}")
    return ctx


def run_phases(ctx: RunContext) -> None:
    """The configured phases in order; a preemption checkpoints, records itself and exits 75."""
    ctx.state.clear_preempted()  # a resumed run: the next state.json written no longer says so
    for phase in ctx.cfg.phases:
        if ctx.state.done(phase) and phase != "report":
            ctx.log(f"[{phase}] already complete, skipped")
            continue
        check_data_unchanged(ctx, phase)
        ctx.log(f"[{phase}] {BY_NAME[phase].summary}")
        ctx.progress.start_phase(phase)
        ctx.watchdog.where = f"the {phase} phase"
        t0 = time.perf_counter()
        try:
            BY_NAME[phase].function()(ctx)
        except Preempted as stop:
            if not stop.synced:
                ctx.world.idle_barrier()
                ctx.stop.agree()
            ctx.stop.drain()
            ctx.state.mark_preempted(phase, time.strftime("%Y-%m-%dT%H:%M:%S%z"), ctx.world.is_root)
            ctx.log(f"[{phase}] stopped on a signal after checkpointing; continue with --resume {ctx.layout.root}")
            ctx.world.barrier()
            if ctx.cfg.preemption.requeue:
                # Finalize first: SLURM kills the job's processes on requeue, and a rank killed before
                # MPI_Finalize leaves shared-memory segments that break MPI_Init of the requeued job.
                ctx.data.release(everything=True)
                ctx.world.finalize()
                if not ctx.world.is_root or requeue_slurm_job(ctx.log):
                    await_requeue_kill()
            raise SystemExit(EXIT_PREEMPTED)
        ctx.log(f"[{phase}] done in {time.perf_counter() - t0:.1f} s")
    ctx.stop.drain()
