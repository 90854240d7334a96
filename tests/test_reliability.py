"""Reliability with real processes and signals: kills, preemption, torn checkpoints, dying ranks."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import time

import pytest
import torch

from tests.helpers import (
    assert_identical, finish, flip_pixel_bytes, kill_all, mounted_tmpfs, prepare, rank_pids, require_ok, resumes,
    run_python, start, strip, trained_an_epoch, wait_for)

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

CFG = ["--threads", "1", "--set", "local.epochs=2", "--set", "dnn.epochs=10", "--set", "global.epochs=2",
       "--set", "coherent.scratch.epochs=2", "--set", "coherent.transfer.epochs=1", "--set", "model.widths=8,16,32",
       "--set", "local.batch_size=32", "--set", "coherent.scratch.batch_size=32", "--set", "global.batch_size=64",
       "--set", "local.augment_shift=0"]


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

    # 1. mid local phase: after the first epoch checkpoints of rank 0's fused local CNNs (0 and 1)
    proc = start(["--data", small_data, "--out", run, *CFG])
    wait_for(proc, lambda: trained_an_epoch(run, every=(0, 1)))
    kill_all(proc)
    held = {}  # subdomain -> the points its checkpoint and .prev hold (a fused group resumes from a common one)
    for p in glob.glob(os.path.join(run, "local", "sub_*.ckpt.pt*")):
        s = torch.load(p, weights_only=True)["state"]
        held.setdefault(int(os.path.basename(p)[4:7]), set()).add((s["epoch"], s["step"]))
    # 2. between phases: local and aggregate complete
    proc = start(["--resume", run])
    wait_for(proc, lambda: {"local", "aggregate"} <= phases_done())
    kill_all(proc)
    local_resumes = {r[1]: (r[2], r[3]) for r in resumes(run) if r[0] == "local"}
    assert local_resumes and set(local_resumes) <= set(held), (local_resumes, held)
    for i, point in local_resumes.items():  # resumed from a point its checkpoints held
        assert tuple(point) in held[i], (i, point, held[i])
    assert any(p[0] >= 1 for p in local_resumes.values()), local_resumes  # not all from the start
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
    # metrics.jsonl holds the epochs trained again after each resume; the last record of each is the reference's
    from hpcdd.events import epoch_records

    def records(r):
        return sorted((json.dumps(strip(e), sort_keys=True) for e in epoch_records(os.path.join(r, "metrics.jsonl"))))

    assert records(run) == records(reference)


def test_sigusr1_to_one_rank_checkpoints_all_and_resumes_identically(small_data, reference, tmp_path):
    run = str(tmp_path / "run")
    # in the local phase (ranks train independently): the signalled rank tells the other one. Rank 1
    # is signalled in its second epoch (after its first checkpoint): each rank's two local CNNs train
    # fused in under a second, so a signal timed by rank 0's progress may find rank 1 already done
    proc = start(["--data", small_data, "--out", run, *CFG])
    wait_for(proc, lambda: trained_an_epoch(run, "sub_002.ckpt.pt") and rank_pids(run))
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
from hpcdd import atomic
atomic.save({{"epoch": 1, "w": torch.ones(3)}}, {str(path)!r})
os.replace = lambda *a: os._exit(9)   # the process dies after writing the new file, before the rename
atomic.save({{"epoch": 2, "w": torch.zeros(3)}}, {str(path)!r})
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
    time.sleep(0.15)  # some steps into the next epoch (of ~0.5 s here, the local CNNs fused)
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
    # the 4 local CNNs of one shape train as one fused model on 1 rank: the line names all of them
    assert re.match(r"error: local subdomains 0, 1, 2, 3: the training loss became (nan|inf) in epoch 1, by step \d+;",
                    lines[0]), lines[0]
    proc = run_python([*args, "--out", str(tmp_path / "two")], ranks=2, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"error: rank [01]: local subdomains (0, 1|2, 3): the training loss became (nan|inf) in epoch 1",
                     proc.stderr), proc.stderr[-3000:]


@pytest.mark.parametrize("phases,setting,training,ranks", [
    ("global", "global.lr=1e6", "global CNN", 2), ("local,aggregate", "dnn.lr=1e9", "DNN", 1),
    ("local,aggregate,coherent", "coherent.scratch.lr=1e9", "coherent scratch", 2)])
def test_a_diverging_loss_is_exit_2_in_every_phase(small_data, tmp_path, phases, setting, training, ranks):
    """The same exit status and line whichever phase's training diverges (SGD at an absurd learning rate)."""
    opt = setting.split(".lr")[0] + ".optimizer=sgd"
    proc = run_python(["-m", "hpcdd.run", "--data", small_data, "--out", str(tmp_path / "run"), "--phases", phases,
                       *CFG, "--set", "local.epochs=1", "--set", opt, "--set", setting], ranks=ranks, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Abort(")]  # MPICH's own line
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and all(re.match(rf"error: (rank \d: )?{training}: the training loss became (nan|inf) in epoch 1",
                                  ln) for ln in lines), lines


def epoch_events(run):
    """Every epoch event of metrics.jsonl without its timings, in order."""
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return [strip(e) for e in lines if "epoch" in e and e.get("event") != "resume"]


def preempt(proc, run, ready, rank, what):
    """SIGUSR1 to ``rank`` once ``ready()``; the run must checkpoint and exit 75."""
    wait_for(proc, lambda: ready() and rank in rank_pids(run))
    os.kill(rank_pids(run)[rank], signal.SIGUSR1)
    code, out, err = finish(proc, 180)
    assert code == 75, f"stop in {what}: exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return json.load(open(os.path.join(run, "state.json")))["preempted"]["phase"]


@pytest.mark.parametrize("ranks", [4, 8])
def test_preemption_in_every_phase_resumes_exactly(small_data, tmp_path, ranks):
    """A stop in each phase in turn (local, the DNN, coherent, global), each resumed: the results,
    every weight and BatchNorm statistic, and every epoch's loss and accuracy equal an uninterrupted
    run's. On 8 ranks the local CNNs have two data-parallel replicas each and the global CNN eight
    workers, so a mid-epoch stop must save every worker's statistics, not only the writer's."""
    cfg = [*CFG, "--set", "dnn.epochs=200", "--set", "global.epochs=3", "--set", "local.epochs=3"]
    ref = str(tmp_path / "ref")
    require_ok(run_python(["-m", "hpcdd.run", "--data", small_data, "--out", ref, *cfg], ranks=ranks, timeout=900))
    run = str(tmp_path / "run")
    layout = os.path.join
    stops = [("local", lambda: glob.glob(layout(run, "local", "sub_*.ckpt.pt")), ranks - 1),
             ("aggregate", lambda: os.path.exists(layout(run, "aggregate", "dnn.ckpt.pt")), 1),
             ("coherent", lambda: os.path.exists(layout(run, "coherent", "scratch", "rank_0000.ckpt.pt")), 0),
             ("global", lambda: os.path.exists(layout(run, "global", "model.ckpt.pt")), ranks - 1)]
    for n, (phase, ready, rank) in enumerate(stops):
        proc = start(["--data", small_data, "--out", run, *cfg] if n == 0 else ["--resume", run], ranks=ranks)
        assert preempt(proc, run, ready, rank, phase) == phase
        if phase in ("local", "global"):
            ckpts = [torch.load(p, weights_only=True) for p in glob.glob(layout(run, phase, "*.ckpt.pt"))]
            mid = [c for c in ckpts if c["state"]["step"] > 0]
            assert mid, [c["state"]["step"] for c in ckpts]  # stopped mid-epoch
            if phase == "global" or ranks == 8:
                workers = ranks if phase == "global" else 2
                assert all(len(c["workers"]) == workers for c in mid), [len(c.get("workers", [])) for c in mid]
    code, out, err = finish(start(["--resume", run], ranks=ranks), 600)
    assert code == 0, err[-3000:]
    assert {r[0] for r in resumes(run)} == {"local", "aggregate", "coherent", "global"}, resumes(run)
    assert_identical(ref, run)
    assert epoch_events(ref) == epoch_events(run)


def test_a_stopped_rank_is_named_and_the_job_ends(small_data, tmp_path):
    """SIGSTOP (a rank stuck in a file system looks the same): the watchdog ends the job, naming the
    silent rank, after the live ranks dumped their Python stacks."""
    run = str(tmp_path / "run")
    proc = start(["--data", small_data, "--out", run, *CFG, "--set", "local.epochs=6", "--set", "watchdog_timeout=6"])
    try:
        wait_for(proc, lambda: glob.glob(os.path.join(run, "local", "sub_*.ckpt.pt")) and len(rank_pids(run)) == 2)
        pid = rank_pids(run)[1]
        t0 = time.time()
        os.kill(pid, signal.SIGSTOP)
        code, out, err = finish(proc, 120)
    finally:
        if proc.poll() is None:
            kill_all(proc)
    assert code != 0 and time.time() - t0 < 90, (code, time.time() - t0)
    report = open(os.path.join(run, "FAILED")).read()
    assert "no rank made progress for 6 s" in report and f"rank 1 (pid {pid} on " in report, report
    assert "rank 0 (" not in report
    assert "Traceback" not in err or "File " in err  # the dumped stacks, not a Python error
    stack = open(os.path.join(run, "progress", "stack_0000.txt")).read()
    assert "File " in stack and "hpcdd" in stack, stack[:2000]


def test_a_running_run_is_locked(small_data, tmp_path):
    """A second --resume or --force of a running run is refused in one line; once its owner is dead
    (SIGKILL), its lock is stale and --resume continues the run."""
    run = str(tmp_path / "run")
    proc = start(["--data", small_data, "--out", run, *CFG, "--set", "local.epochs=6"])
    try:
        wait_for(proc, lambda: os.path.exists(os.path.join(run, "LOCK")) and rank_pids(run))
        owner = json.load(open(os.path.join(run, "LOCK")))
        assert owner["pid"] == rank_pids(run)[0], owner
        for pid in rank_pids(run).values():  # alive but held: the run cannot end (and release its lock) on
            os.kill(pid, signal.SIGSTOP)     # a loaded machine before the second hpcdd-run has started
        for args in (["--resume", run], ["--data", small_data, "--out", run, "--force"]):
            second = run_python(["-m", "hpcdd.run", *args], timeout=120)
            lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
            assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
            assert f"is in use by a running hpcdd-run (pid {owner['pid']} on " in lines[0], lines
        assert proc.poll() is None and os.path.exists(os.path.join(run, "config.json"))  # untouched
    finally:
        kill_all(proc)
    assert os.path.exists(os.path.join(run, "LOCK"))  # left behind by the killed owner
    proc = run_python(["-m", "hpcdd.run", "--resume", run, "--phases", "local"], ranks=2, timeout=300)
    require_ok(proc)
    assert json.load(open(os.path.join(run, "state.json")))["phases"]["local"]["done"]
    assert not os.path.exists(os.path.join(run, "LOCK"))


def test_data_prepared_again_during_a_run_stops_it(fashion_dir, tmp_path):
    """data_prep --force into DATA while a run reads it (another seed: another validation split): the
    run stops at the next phase start with one line naming the change, instead of mixing the two
    (or, if a rank opens a shard of the new preparation first, with the line naming that shard)."""

    data = tmp_path / "data"
    prepare(fashion_dir, data)
    old = json.load(open(data / "manifest.json"))["prep_id"]
    run = str(tmp_path / "run")
    proc = start(["--data", str(data), "--out", run, *CFG, "--set", "local.epochs=8"])
    # both ranks hold every shard they read open (their second subdomains started): the files are replaced
    # under open handles, which keep reading the old preparation
    wait_for(proc, lambda: all(any(os.path.exists(os.path.join(run, "local", f"sub_{i:03d}{end}"))
                                   for end in (".ckpt.pt", ".pt")) for i in (1, 3)))
    prepare(fashion_dir, data, extra=["--force", "--seed", "1"])
    new = json.load(open(data / "manifest.json"))["prep_id"]
    assert new != old
    code, out, err = finish(proc, 300)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("Abort(")]  # MPICH's own line
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("error: ") and "rank" not in lines[0].split(":")[1]  # agreed: said once, not per rank
    at_phase = re.search(rf"was prepared again during the run \(prep id {old} -> {new}\); stopped before the (\w+) "
                         rf"phase", lines[0])
    assert at_phase or f"holds prep id {new} but the manifest says {old}" in lines[0], lines[0]
    if at_phase:
        assert at_phase.group(1) not in json.load(open(os.path.join(run, "state.json")))["phases"]


@pytest.mark.parametrize("streamed", [True, False])
def test_a_shard_copied_over_during_a_run_is_refused_when_read_again(fashion_dir, tmp_path, streamed):
    """Another preparation's sub_001.h5 copied over the one a run reads (in place: same inode, as cp does),
    while the local phase trains on it, streamed (read window by window) or in memory (read again by
    the aggregate phase): the run stops with one line naming the shard, never trains or scores on a mix."""
    import shutil


    data, other = tmp_path / "data", tmp_path / "other"
    prepare(fashion_dir, data)
    prepare(fashion_dir, other, extra=["--seed", "1"])
    run = str(tmp_path / "run")
    extra = ["--set", "memory_limit_gb=0.0005"] if streamed else []
    proc = start(["--data", str(data), "--out", run, *CFG, "--set", "local.epochs=6", *extra])
    wait_for(proc, lambda: trained_an_epoch(run, "sub_001*.ckpt.pt") or trained_an_epoch(run, "group_*.ckpt.pt"))
    ino = os.stat(data / "sub_001.h5").st_ino
    shutil.copyfile(other / "sub_001.h5", data / "sub_001.h5")
    assert os.stat(data / "sub_001.h5").st_ino == ino  # rewritten in place, not replaced
    code, out, err = finish(proc, 300)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("Abort(")]  # MPICH's own line
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
    assert f"{data}/sub_001.h5: changed on disk since this run first opened it" in lines[0], lines[0]
    assert not os.path.exists(os.path.join(run, "results.json"))


def test_a_resume_on_another_rank_count_is_refused_at_start(small_data, tmp_path):
    """Killed in the coherent phase on 2 ranks (its checkpoints hold one rank's share each), resumed on 4:
    refused before any training with the reason, not at the coherent phase with another one."""
    run = str(tmp_path / "run")
    proc = start(["--data", small_data, "--out", run, *CFG, "--set", "coherent.scratch.epochs=20"])
    wait_for(proc, lambda: glob.glob(os.path.join(run, "coherent", "scratch", "rank_0001.ckpt.pt")))
    kill_all(proc)
    proc.communicate()
    t0 = time.time()
    resumed = run_python(["-m", "hpcdd.run", "--resume", run, "--threads", "1"], ranks=4, timeout=120)
    lines = [ln for ln in resumed.stderr.splitlines() if ln.strip()]
    assert resumed.returncode == 2 and len(lines) == 1, resumed.stderr[-3000:]
    assert (f"--resume {run}: the run was interrupted in the coherent phase on 2 ranks, whose checkpoints "
            f"(coherent/*/rank_*.ckpt.pt) hold one rank's share each; resume it with 2 ranks, not 4") in lines[0]
    assert "[local]" not in resumed.stdout and time.time() - t0 < 60
    require_ok(run_python(["-m", "hpcdd.run", "--resume", run, "--threads", "1"], ranks=2, timeout=300))


def test_damaged_pixels_stop_the_run_in_one_line(small_data, tmp_path):
    """20,000 bytes flipped inside a stored chunk of one shard (a bad disk or copy): the run stops when it
    reads that chunk, one line naming shard, split and chunk, instead of training on it with exit 0."""
    import shutil


    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    flip_pixel_bytes(data / "sub_001.h5", "train", 2)
    proc = run_python(["-m", "hpcdd.run", "--data", str(data), "--out", str(tmp_path / "run"), *CFG], ranks=2,
                      timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Abort(")]  # MPICH's own line
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{data}/sub_001.h5: damaged data in train/x chunk 2 (images " in lines[0], lines[0]
    assert "checksum mismatch" in lines[0] and not (tmp_path / "run" / "results.json").exists()


@pytest.fixture()
def disk(tmp_path):
    """A 90 MB tmpfs."""
    yield from mounted_tmpfs(tmp_path, "90m")


def test_full_disk_during_a_run_is_one_line_and_resumable(small_data, disk):
    """The disk fills up mid-run: one line naming the file, RUN/FAILED says it (space was reserved for
    that), and once space is freed --resume continues from the checkpoints written before."""
    run = str(disk / "run")
    proc = start(["--data", small_data, "--out", run, *CFG, "--set", "local.epochs=8", "--phases", "local"])
    wait_for(proc, lambda: glob.glob(os.path.join(run, "local", "sub_*.ckpt.pt")))
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    code, out, err = finish(proc, 300)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("Abort(")]  # MPICH's own line
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert re.match(r"error: rank [01]: \S+: no space left on its file system", lines[0]), lines[0]
    assert "no space left" in open(os.path.join(run, "FAILED")).read()
    os.unlink(filler)
    code, out, err = finish(start(["--resume", run]), 300)
    assert code == 0, err[-3000:]
    assert {r[0] for r in resumes(run)} == {"local"}, resumes(run)


def test_ctrl_c_to_mpiexec_is_one_line(small_data, tmp_path):
    run = str(tmp_path / "run")
    proc = start(["--data", small_data, "--out", run, *CFG, "--set", "local.epochs=8"])
    wait_for(proc, lambda: glob.glob(os.path.join(run, "local", "sub_*.ckpt.pt")))
    os.kill(proc.pid, signal.SIGINT)  # mpiexec forwards it to every rank
    code, out, err = finish(proc, 120)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("Abort(")]
    assert code != 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert lines == [f"hpcdd: interrupted (SIGINT); checkpoints written so far are kept: continue with --resume {run}"], lines


def test_a_killed_launcher_is_named_as_such(small_data, tmp_path):
    """SIGKILL to mpiexec takes the ranks down with it: RUN/FAILED blames the launcher, not rank 0."""
    run = str(tmp_path / "run")
    proc = start(["--data", small_data, "--out", run, *CFG, "--set", "local.epochs=8"])
    wait_for(proc, lambda: glob.glob(os.path.join(run, "local", "sub_*.ckpt.pt")) and rank_pids(run))
    pids = rank_pids(run)
    proc.kill()
    proc.wait(timeout=30)
    t0 = time.time()
    while not os.path.exists(os.path.join(run, "FAILED")) and time.time() - t0 < 30:
        time.sleep(0.1)
    for pid in pids.values():  # whatever the launcher left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    report = open(os.path.join(run, "FAILED")).read()
    assert "was killed together with its launcher" in report and "not by a failure of hpcdd" in report, report
