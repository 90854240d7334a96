"""``python -m hpcdd.run``: parse the configuration, build the world, run the phases, clean up.

    srun -n 4 python -m hpcdd.run --data DATA --out RUN [--config run.toml] [--set local.epochs=10]
"""

from __future__ import annotations

import argparse
import os

from .atomic import disk_full
from .cli_util import OneLineParser, count
from .config import PHASES, Config, build_config, config_of_run, load_toml, parse_override, to_toml
from .errors import AgreedError, UserError, fail
from .parallel.failures import (interrupted, mpi_init_begins, mpi_init_done, report_failure, start_death_watch,
                                user_error_exit)
from .parallel.launcher import world_info
from .parallel.watchdog import release
from .parallel.world import init_world


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="hpcdd-run", description=(
        "Train a CNN-DNN by domain decomposition on prepared HDF5 shards: local CNNs in parallel over MPI "
        "ranks, the DNN aggregator, the coherent CNN-DNN and the global CNN baseline. Launch with srun, "
        "mpirun/mpiexec or plain python."))
    p.add_argument("--config", metavar="FILE", help="TOML file with configuration sections (see README)")
    p.add_argument("--data", metavar="DATA", help="directory written by data_prep")
    p.add_argument("--out", metavar="RUN", help="run directory to create (must not exist)")
    p.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    p.add_argument("--epochs", type=count(1), help="epochs of every CNN training phase (local, coherent, global); "
                   "a specific key given with --set (e.g. --set coherent.transfer.epochs=5) wins over it")
    p.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: the GPU of the local rank if any")
    p.add_argument("--threads", type=count(0), help="torch threads per rank (default: cores per node / ranks per node)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any configuration key, e.g. --set local.lr=0.01 (repeatable)")
    p.add_argument("--requeue", action="store_true",
                   help="under SLURM: after a preemption checkpoint, `scontrol requeue` the job so it resumes by itself")
    p.add_argument("--force", action="store_true", help="replace RUN if it exists")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN where it stopped")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as TOML (usable with --config) and exit")
    return p


def resolve_config(args) -> Config:
    """Defaults < TOML file < command-line shorthands (--epochs) < command-line keys (--set, --seed, ...);
    with --resume, the run's own config.json."""
    overrides = dict(parse_override(s) for s in args.set)
    for key in ("data", "out", "seed", "device", "threads", "phases"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.requeue:
        overrides["preemption.requeue"] = "true"
    shorthands = {}
    if args.epochs is not None:
        shorthands = {key: args.epochs for key in ("local.epochs", "global.epochs", "coherent.scratch.epochs",
                                                   "coherent.transfer.epochs")}
    if args.resume:
        if args.config or args.force or shorthands or set(overrides) - {"phases", "out", "threads",
                                                                         "preemption.requeue"}:
            raise UserError("--resume takes its configuration from RUN/config.json; give only --phases, --threads "
                            "or --requeue with it")
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise UserError(f"--out {args.out} differs from --resume {args.resume}; give only --resume")
        return config_of_run(args.resume, overrides, f"--resume {args.resume}")
    values = load_toml(args.config) if args.config else {}
    cfg = build_config(values, overrides, args.config or "config", shorthands)
    if args.print_config:
        return cfg
    if not cfg.data:
        raise UserError("--data: missing; give the directory written by data_prep (or data = \"...\" in --config)")
    if not cfg.out:
        raise UserError("--out: missing; give a new run directory (or out = \"...\" in --config)")
    cfg.data = os.path.abspath(cfg.data)  # RUN/config.json must find the data from any directory (--resume, hpcdd-report)
    return cfg


def env_rank() -> int:
    return world_info(os.environ).rank


def main(argv=None) -> int:
    world = None
    ctx = None
    cfg = None
    try:
        args = build_parser().parse_args(argv)
        cfg = resolve_config(args)
        if args.print_config:
            if env_rank() == 0:
                print(to_toml(cfg), end="")
            return 0

        start_death_watch(env_rank(), cfg.out)
        mpi_init_begins()
        world = init_world(device=cfg.device, threads=cfg.threads or None)
        mpi_init_done()
        world.run_dir = cfg.out
        from .runner import prepare, run_phases

        ctx = prepare(cfg, world, resume=bool(args.resume), force=args.force)
        run_phases(ctx)
        return 0
    except UserError as e:
        collective = world is None or ctx is None or isinstance(e, AgreedError)
        if world is None:
            fail(str(e) if env_rank() == 0 else None)
        user_error_exit(world, str(e), collective)
    except SystemExit:
        raise
    except OSError as e:
        full = disk_full(e.filename or (cfg.out if cfg is not None else "RUN"), e)
        if full is None:
            report_failure(world, e)
        user_error_exit(world, str(full), world is None or ctx is None)
    except KeyboardInterrupt:
        interrupted(world, cfg.out if cfg is not None else None)
    except BaseException as e:  # noqa: BLE001 - any failure on one rank must end every rank
        report_failure(world, e)
    finally:
        if ctx is not None:
            ctx.watchdog.stop()
            ctx.data.release(everything=True)
            ctx.events.close()
            if ctx.world.is_root:
                release(ctx.layout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
