"""Helpers shared by the benchmarks: a prepared Fashion-MNIST dataset and timing utilities."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

FASHION = os.environ.get("HPCDD_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepared(grid: str, overlap: int, train: int | None, workdir: str | None = None, extra=()) -> str:
    """A data_prep output of real Fashion-MNIST in a temporary (or given) directory."""
    from data_prep.cli import run

    workdir = workdir or tempfile.mkdtemp(prefix="hpcdd-bench-")
    out = os.path.join(workdir, f"fm_{grid}_{overlap}_{train or 'all'}")
    if not os.path.exists(out):
        args = ["idx", FASHION, out, "--grid", grid, "--overlap", str(overlap), "--name", "fashion-mnist", "--quiet"]
        if train:
            args += ["--max-train", str(train)]
        run(args + list(extra))
    return out


def mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else "mpiexec"


def launch(args, ranks: int | None = None, timeout: float = 3600) -> str:
    cmd = [sys.executable] + list(args)
    if ranks:
        cmd = [mpiexec(), "-n", str(ranks)] + cmd
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def median(values) -> float:
    return statistics.median(values)
