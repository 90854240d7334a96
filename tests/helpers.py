"""Helpers the test modules share (fixtures stay in conftest.py): paths, real MPI launches, data
preparation, kill-and-resume plumbing, result comparison, SLURM job templates."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FASHION = os.environ.get("HPCDD_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


RUNNING: dict = {}  # the test being run (conftest.py sets it): its markers must say what it starts


def require_marker(name: str, what: str) -> None:
    """Fail a test that starts ``what`` without the marker ``name`` (so ``-m "not mpi and not slurm"``
    is truly the fast, single-process layer)."""
    node = RUNNING.get("node")
    if node is not None and node.get_closest_marker(name) is None:
        pytest.fail(f"{node.nodeid} starts {what} but is not marked @pytest.mark.{name}")


def mpiexec_path() -> str:
    """The mpiexec beside this Python (pip's mpich in the venv) first, then PATH."""
    require_marker("mpi", "MPI ranks")
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


TIMING = ("seconds", "speedup", "images_per_s", "created", "started", "time", "comm_bytes", "efficiency")


def start(args, ranks=2):
    cmd = [mpiexec_path(), "-n", str(ranks), sys.executable, "-m", "hpcdd.run", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for_tests(),
                            start_new_session=True)


def wait_for(proc, condition, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            return True
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended (exit {proc.returncode}) before the kill point\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("kill point never reached")


def trained_an_epoch(run, pattern="sub_*.ckpt.pt", every=()):
    """Whether a local checkpoint matching ``pattern`` holds a completed epoch (fused trainings also
    write one at the start); with ``every`` (subdomains), whether each of them does: a fused group
    resumes from the last point all of its checkpoints hold, and they are written one after another."""
    done = set()
    for p in glob.glob(os.path.join(run, "local", pattern)):
        try:
            if torch.load(p, weights_only=True)["state"]["epoch"] >= 1:
                done.add(int(os.path.basename(p)[4:7]))
        except (OSError, RuntimeError, EOFError):
            pass  # replaced while being read
    return set(every) <= done if every else bool(done)


def kill_all(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def rank_pids(run_dir):
    """PID of each rank, from the ranks.json the run writes at start."""
    path = os.path.join(run_dir, "ranks.json")
    return {r["rank"]: r["pid"] for r in json.load(open(path))["ranks"]} if os.path.exists(path) else {}


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def resumes(run):
    """The resume events of a run's metrics.jsonl: (phase, subdomain or strategy, epoch, step)."""
    out = []
    for line in open(os.path.join(run, "metrics.jsonl")):
        e = json.loads(line)
        if e.get("event") == "resume":
            out.append((e["phase"], e.get("subdomain", e.get("strategy", e.get("model"))), e["epoch"], e["step"]))
    return out


def assert_identical(a, b, ignore=()):
    """Runs ``a`` and ``b`` hold the same results (but timings and the keys ``ignore``) and the same tensors."""
    ra, rb = (strip(json.load(open(os.path.join(r, "results.json")))) for r in (a, b))
    assert {k: v for k, v in ra.items() if k not in ignore} == {k: v for k, v in rb.items() if k not in ignore}
    files = sorted(os.path.relpath(p, b) for p in glob.glob(os.path.join(b, "**", "*.pt"), recursive=True))
    assert files == sorted(os.path.relpath(p, a) for p in glob.glob(os.path.join(a, "**", "*.pt"), recursive=True))
    assert "model.pt" in files and "local/sub_003.pt" in files

    def tensors(obj, prefix=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k not in ("summary", "info", "meta"):
                    yield from tensors(v, f"{prefix}/{k}")
        elif torch.is_tensor(obj):
            yield prefix, obj

    for f in files:
        ta = dict(tensors(torch.load(os.path.join(a, f), weights_only=True)))
        tb = dict(tensors(torch.load(os.path.join(b, f), weights_only=True)))
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{f}{k} differs"


SMALL = ("--set local.epochs=2 --set dnn.epochs=10 --set global.epochs=1 --set coherent.scratch.epochs=1 "
         "--set coherent.transfer.epochs=1 --set model.widths=8,16,32 --set local.batch_size=32")


def job_env(cluster, **extra):
    env = dict(cluster.env, HPCDD_PYTHON=sys.executable, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def edited(template: str, dest, lines: dict, sbatch: dict | None = None) -> str:
    """The template with its EDIT lines set as a user would (and #SBATCH values changed)."""
    text = open(os.path.join(ROOT, "jobs", template)).read()
    for key, value in lines.items():
        text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        assert n == 1, key
    for key, value in (sbatch or {}).items():
        text, n = re.subn(rf"^#SBATCH --{key}=.*$", f"#SBATCH --{key}={value}", text, flags=re.M)
        assert n == 1, key
    path = os.path.join(str(dest), template)
    with open(path, "w") as f:
        f.write(text)
    return path


def flip_pixel_bytes(path, split: str, chunk: int, count: int = 20000) -> None:
    """Flip ``count`` bytes of one stored chunk of ``split``/x, behind HDF5's back (a bad disk, a bad copy)."""
    with h5py.File(path, "r") as f:
        info = f[f"{split}/x"].id.get_chunk_info(chunk)
    n = min(count, info.size - 8)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        raw = bytearray(f.read(n))
        f.seek(info.byte_offset)
        f.write(bytes(b ^ 0x5A for b in raw))


def cifar_pickles(src, x, y, x_test, y_test, names) -> None:
    """torchvision's ``cifar-10-batches-py`` layout in ``src``: five training batches, the test batch
    and the class names (``x``: uint8 (n, 3, 32, 32), n divisible by 5)."""
    import pickle

    os.makedirs(src)
    per = len(x) // 5
    for j in range(5):
        with open(os.path.join(src, f"data_batch_{j + 1}"), "wb") as f:
            part = slice(j * per, (j + 1) * per)
            pickle.dump({b"data": x[part].reshape(per, -1), b"labels": y[part].tolist()}, f)
    with open(os.path.join(src, "test_batch"), "wb") as f:
        pickle.dump({b"data": x_test.reshape(len(x_test), -1), b"labels": list(map(int, y_test))}, f)
    with open(os.path.join(src, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names]}, f)
