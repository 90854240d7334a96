"""Reliability with real processes and signals: kills, preemption, torn checkpoints, dying ranks."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import env_for_tests, mpiexec_path, require_ok, run_python

pytestmark = pytest.mark.mpi

CFG = ["--threads", "1", "--set", "local.epochs=2", "--set", "dnn.epochs=10", "--set", "global.epochs=2",
       "--set", "coherent.scratch.epochs=2", "--set", "coherent.transfer.epochs=1", "--set", "model.widths=8,16,32",
       "--set", "local.batch_size=32", "--set", "coherent.scratch.batch_size=32", "--set", "global.batch_size=64",
       "--set", "local.augment_shift=0"]
TIMING = ("seconds", "speedup", "images_per_s", "created", "started", "time")


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


def assert_identical(a, b):
    assert strip(json.load(open(os.path.join(a, "results.json")))) == strip(json.load(open(os.path.join(b, "results.json"))))
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


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_python(["-m", "hpcdd.run", "--data", small_data, "--out", str(out), *CFG], ranks=2, timeout=600)
    require_ok(proc)
    return str(out)


def test_sigkill_at_several_points_then_resume_is_bit_identical(small_data, reference, tmp_path):
    run = str(tmp_path / "run")
    state = os.path.join(run, "state.json")

    def phases_done():
        try:
            return set(k for k, v in json.load(open(state))["phases"].items() if v.get("done"))
        except (OSError, ValueError, KeyError):
            return set()

    # 1. mid local phase: after the first epoch checkpoint of some local CNN
    proc = start(["--data", small_data, "--out", run, *CFG])
    wait_for(proc, lambda: glob.glob(os.path.join(run, "local", "sub_*.ckpt.pt")))
    kill_all(proc)
    saved = {int(os.path.basename(p)[4:7]): torch.load(p, weights_only=True)["state"]
             for p in glob.glob(os.path.join(run, "local", "sub_*.ckpt.pt"))}
    # 2. between phases: local and aggregate complete
    proc = start(["--resume", run])
    wait_for(proc, lambda: {"local", "aggregate"} <= phases_done())
    kill_all(proc)
    local_resumes = {r[1]: (r[2], r[3]) for r in resumes(run) if r[0] == "local"}
    assert local_resumes and set(local_resumes) <= set(saved), (local_resumes, saved)
    for i, point in local_resumes.items():  # resumed where the checkpoint left off, not from scratch
        assert point[0] >= 1 and point[0] >= saved[i]["epoch"], (i, point, saved[i]["epoch"])
    # 3. mid coherent phase: after an epoch checkpoint of the scratch strategy
    proc = start(["--resume", run])
    ckpts = [os.path.join(run, "coherent", "scratch", f"rank_{r:04d}.ckpt.pt") for r in (0, 1)]
    wait_for(proc, lambda: all(os.path.exists(c) for c in ckpts))
    kill_all(proc)
    epoch = min(torch.load(c, weights_only=True)["state"]["epoch"] for c in ckpts)
    code, out, err = finish(start(["--resume", run]))
    assert code == 0, err[-3000:]
    assert ("coherent", "scratch", epoch, 0) in resumes(run), resumes(run)
    assert_identical(reference, run)


def test_sigusr1_to_one_rank_checkpoints_all_and_resumes_identically(small_data, reference, tmp_path):
    run = str(tmp_path / "run")
    # in the local phase (ranks train independently): the signalled rank tells the other one
    proc = start(["--data", small_data, "--out", run, *CFG])
    wait_for(proc, lambda: glob.glob(os.path.join(run, "local", "sub_000.ckpt.pt")) and rank_pids(run))
    os.kill(rank_pids(run)[1], signal.SIGUSR1)
    code, out, err = finish(proc, 120)
    assert code == 75, err[-3000:]
    assert "stopped on a signal" in out
    assert json.load(open(os.path.join(run, "state.json")))["preempted"]["phase"] == "local"
    stopped = {int(os.path.basename(p)[4:7]): torch.load(p, weights_only=True)["state"]
               for p in glob.glob(os.path.join(run, "local", "sub_*.ckpt.pt"))}
    assert stopped and any(s["step"] > 0 for s in stopped.values()), stopped  # stopped mid-epoch
    # in the coherent phase (lockstep): every rank checkpoints after the same step
    proc = start(["--resume", run])
    ckpts = [os.path.join(run, "coherent", "scratch", f"rank_{r:04d}.ckpt.pt") for r in (0, 1)]
    wait_for(proc, lambda: all(os.path.exists(c) for c in ckpts))
    os.kill(rank_pids(run)[0], signal.SIGUSR1)
    code, out, err = finish(proc, 120)
    assert code == 75, err[-3000:]
    steps = [(c["state"]["epoch"], c["state"]["step"]) for c in (torch.load(p, weights_only=True) for p in ckpts)]
    assert steps[0] == steps[1], steps
    code, out, err = finish(start(["--resume", run]))
    assert code == 0, err[-3000:]
    assert "preempted" not in json.load(open(os.path.join(run, "state.json")))
    seen = resumes(run)
    for i, s in stopped.items():
        assert ("local", i, s["epoch"], s["step"]) in seen, (i, s, seen)
    assert ("coherent", "scratch", *steps[0]) in seen, (steps, seen)
    assert_identical(reference, run)


def test_crash_between_write_and_rename_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    script = f"""
import os, torch
from hpcdd import checkpoint
checkpoint.save({{"epoch": 1, "w": torch.ones(3)}}, {str(path)!r})
os.replace = lambda *a: os._exit(9)   # the process dies after writing the new file, before the rename
checkpoint.save({{"epoch": 2, "w": torch.zeros(3)}}, {str(path)!r})
"""
    proc = run_python(["-c", script])
    assert proc.returncode == 9
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1 and torch.equal(saved["w"], torch.ones(3))
    assert any(p.endswith(".tmp") for p in os.listdir(tmp_path))  # the torn new file never replaced it


def test_sigkilled_rank_ends_the_job_quickly(small_data, tmp_path):
    run = str(tmp_path / "run")
    proc = start(["--data", small_data, "--out", run, *CFG], ranks=4)
    wait_for(proc, lambda: glob.glob(os.path.join(run, "local", "sub_*.ckpt.pt")) and len(rank_pids(run)) == 4)
    t0 = time.time()
    os.kill(rank_pids(run)[2], signal.SIGKILL)
    code, out, err = finish(proc, 60)
    assert code != 0
    assert time.time() - t0 < 30
    time.sleep(0.5)  # the watcher of the killed rank writes its report as the launcher cleans up
    report = open(os.path.join(run, "FAILED")).read()
    assert report.startswith(f"hpcdd: rank 2 (pid {rank_pids(run)[2]} ") and "killed by a signal" in report, report
    assert "rank 2" in out + err, (out + err)[-2000:]


def test_signal_to_a_waiting_rank_stops_dnn_training_and_resumes_identically(small_data, tmp_path):
    """Rank 0 trains the DNN alone while rank 1 waits: a SIGUSR1 to rank 1 still stops rank 0 at its
    next step (after a checkpoint), and the resumed run equals an uninterrupted one."""
    long_dnn = [*CFG, "--phases", "local,aggregate,report", "--set", "dnn.epochs=300"]
    ref = str(tmp_path / "ref")
    require_ok(run_python(["-m", "hpcdd.run", "--data", small_data, "--out", ref, *long_dnn], ranks=2, timeout=600))
    run = str(tmp_path / "run")
    proc = start(["--data", small_data, "--out", run, *long_dnn])
    ckpt = os.path.join(run, "aggregate", "dnn.ckpt.pt")
    wait_for(proc, lambda: os.path.exists(ckpt) and rank_pids(run))
    os.kill(rank_pids(run)[1], signal.SIGUSR1)
    code, out, err = finish(proc, 120)
    assert code == 75, err[-3000:]
    assert json.load(open(os.path.join(run, "state.json")))["preempted"]["phase"] == "aggregate"
    stopped = torch.load(ckpt, weights_only=True)["state"]
    assert 1 <= stopped["epoch"] < 300 and (stopped["epoch"], stopped["step"]) != (300, 0), stopped
    code, out, err = finish(start(["--resume", run]))
    assert code == 0, err[-3000:]
    assert ("aggregate", "dnn", stopped["epoch"], stopped["step"]) in resumes(run), resumes(run)
    assert strip(json.load(open(os.path.join(ref, "aggregate", "result.json")))) == \
        strip(json.load(open(os.path.join(run, "aggregate", "result.json"))))
    a = torch.load(os.path.join(ref, "aggregate", "dnn.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(run, "aggregate", "dnn.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_agrees_on_a_checkpoint_every_rank_holds(small_data, reference, tmp_path):
    """A rank killed while writing its coherent checkpoint leaves the ranks one checkpoint apart: every
    rank resumes from the newest point all of them hold (the previous one is kept until the next is
    complete), and the run ends as the uninterrupted one."""
    run = str(tmp_path / "run")
    proc = start(["--data", small_data, "--out", run, *CFG])
    ckpts = [os.path.join(run, "coherent", "scratch", f"rank_{r:04d}.ckpt.pt") for r in (0, 1)]
    wait_for(proc, lambda: all(os.path.exists(c) for c in ckpts))
    time.sleep(0.5)  # some steps into the next epoch
    os.kill(rank_pids(run)[0], signal.SIGUSR1)
    code, out, err = finish(proc, 120)
    assert code == 75, err[-3000:]
    newest = torch.load(ckpts[1], weights_only=True)["state"]
    previous = torch.load(ckpts[1] + ".prev", weights_only=True)["state"]
    assert (newest["epoch"], newest["step"]) > (previous["epoch"], previous["step"]), (newest, previous)
    os.replace(ckpts[1] + ".prev", ckpts[1])  # rank 1 lost its newest checkpoint; rank 0 holds both
    code, out, err = finish(start(["--resume", run]), 300)
    assert code == 0, err[-3000:]
    assert ("coherent", "scratch", previous["epoch"], previous["step"]) in resumes(run), resumes(run)
    assert_identical(reference, run)


def test_a_diverging_loss_stops_the_run_with_one_line(small_data, tmp_path):
    """A learning rate that makes the loss NaN ends the run with one line naming the training, epoch and step."""
    args = ["-m", "hpcdd.run", "--data", small_data, "--phases", "local", "--threads", "1",
            "--set", "local.optimizer=sgd", "--set", "local.lr=1e6", "--set", "model.widths=8,16,32"]
    proc = run_python([*args, "--out", str(tmp_path / "one")], timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert re.match(r"error: local subdomain 0: the training loss became (nan|inf) in epoch 1, by step \d+;", lines[0])
    proc = run_python([*args, "--out", str(tmp_path / "two")], ranks=2, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"error: rank [01]: local subdomain [02]: the training loss became (nan|inf) in epoch 1",
                     proc.stderr), proc.stderr[-3000:]
