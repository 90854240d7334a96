"""Shared fixtures: real Fashion-MNIST, prepared shards, and a launcher for real MPI ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = os.environ.get("HPCDD_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


def mpiexec_path() -> str:
    """The mpiexec beside this Python (pip's mpich in the venv) first, then PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec")
    if not found:
        pytest.fail("mpiexec not found: install MPI (pip install mpich)")
    return found


def env_for_tests(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT})
    env.pop("SLURM_NTASKS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(args, ranks: int | None = None, timeout: float = 300, env: dict | None = None, cwd=None):
    """Run ``python ARGS`` (under ``mpiexec -n ranks`` when ranks is given); returns CompletedProcess."""
    cmd = [sys.executable] + list(args)
    if ranks is not None:
        cmd = [mpiexec_path(), "-n", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or env_for_tests(),
                          cwd=cwd or ROOT)


def require_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def fashion_dir() -> str:
    if not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")):
        if os.environ.get("HPCDD_REQUIRE_DATA", "1") == "1":
            pytest.fail(f"Fashion-MNIST not found in {FASHION}: apt-get install dataset-fashion-mnist "
                        f"(or set HPCDD_REQUIRE_DATA=0 to skip)")
        pytest.skip("Fashion-MNIST not installed")
    return FASHION


def fashion_images(fashion_dir, train: int, test: int = 0):
    """(x, y, x_test, y_test): the first ``train`` training and ``test`` test images of real Fashion-MNIST."""
    from data_prep.sources import read_idx

    return tuple(read_idx(f"{fashion_dir}/{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz")[:n]
                 for split, n in (("train", train), ("t10k", test)) for kind in ("images", "labels"))


def shard_digest(out) -> dict:
    """sha256 of every .h5 file of a data_prep output, by name: outputs compared byte for byte."""
    import glob
    import hashlib

    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(str(out), "*.h5")))}


def prepare(fashion_dir, out, grid="2x2", overlap=1, train=2000, test=1000, extra=()):
    from data_prep.cli import run

    return run(["idx", fashion_dir, str(out), "--grid", grid, "--overlap", str(overlap), "--max-train", str(train),
                "--max-test", str(test), "--name", "fashion-mnist", "--quiet", *extra])


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, fashion_dir) -> str:
    """2x2 grid, overlap 1, 2000 training images (1800 train / 200 val), 1000 test images."""
    out = tmp_path_factory.mktemp("data") / "fm22"
    prepare(fashion_dir, out)
    return str(out)


def mounted_tmpfs(tmp_path, size: str):
    """A generator for a fixture: a real file system of ``size`` (e.g. "3m") that fills up, unmounted after."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) nothing may be skipped: a missing SLURM, MPI or dataset there is a broken
    install step, not a reason to pass. Locally a skip says why."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI", "").lower() == "true" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"


@pytest.fixture(scope="session", autouse=True)
def clean_mpich_shared_memory():
    """Ranks the tests kill with SIGKILL leave MPICH shared-memory files behind: remove the new ones."""
    import glob

    before = set(glob.glob("/dev/shm/mpich_shm_*"))
    yield
    for path in set(glob.glob("/dev/shm/mpich_shm_*")) - before:
        try:
            os.unlink(path)
        except OSError:
            pass
