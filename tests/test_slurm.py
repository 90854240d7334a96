"""The job templates on a real single-node SLURM cluster (slurmctld + slurmd + munged on localhost)."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest

from tests.helpers import ROOT, SMALL, assert_identical, edited, job_env, require_ok, run_python
from tests.slurm_cluster import Cluster, missing

pytestmark = [pytest.mark.mpi, pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why is not None:
        pytest.skip(f"SLURM: {why}")  # a failure in CI (tests/conftest.py): there it must run
    c = Cluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def submit(cluster, script, cwd, env) -> str:
    out = cluster.run("sbatch", "--parsable", script, cwd=str(cwd), env=env).stdout.strip()
    return out.split(";")[0]


def test_every_template_says_what_to_edit():
    for name in ("train_gpu.sbatch", "train_cpu.sbatch", "sweep.sbatch", "prepare.sbatch"):
        text = open(os.path.join(ROOT, "jobs", name)).read()
        assert text.startswith("#!/bin/bash\n# hpcdd") and "Edit the two lines" in text
        assert len(re.findall(r"# EDIT", text)) == 2, name
        for needle in ("##SBATCH --partition=", "##SBATCH --account=", "build mpi4py against it"):
            assert needle in text, (name, needle)
        sbatch = text.index("#SBATCH")
        assert all(not ln.strip() or ln.startswith("#") for ln in text[:text.rindex("#SBATCH")].splitlines()), name
        assert sbatch > 0
    gpu = open(os.path.join(ROOT, "jobs", "train_gpu.sbatch")).read()
    for needle in ("--gpus-per-task=1", "--cpus-per-task", "--kill-on-bad-exit", "MPI_PLUGIN", "HDF5_USE_FILE_LOCKING",
                   "--signal=USR1", "--requeue", "SLURM_CPUS_PER_TASK"):
        assert needle in gpu, needle


def test_srun_end_to_end(cluster, small_data, tmp_path):
    run = tmp_path / "run"
    proc = cluster.run("srun", "-n", "4", "--mpi=pmi2", "--kill-on-bad-exit=1", sys.executable, "-m", "hpcdd.run",
                       "--data", small_data, "--out", str(run), *SMALL.split(), timeout=600, check=False,
                       env=job_env(cluster))
    require_ok(proc)
    res = json.load(open(run / "results.json"))
    assert res["ranks"] == 4 and len(res["rows"]) == 7
    assert next(r for r in res["rows"] if r["method"] == "CNN-DNN")["test"] > 0.4  # tiny nets, 2 epochs; chance 0.1
    assert json.load(open(run / "ranks.json"))["ranks"][3]["rank"] == 3


@pytest.fixture(scope="module")
def mpiexec_reference(small_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = run_python(["-m", "hpcdd.run", "--data", small_data, "--out", str(run), "--threads", "1", *SMALL.split()],
                      ranks=2, timeout=600)
    require_ok(proc)
    return str(run)


def test_sbatch_train_cpu_matches_mpiexec(cluster, small_data, mpiexec_reference, tmp_path):
    run = tmp_path / "run"
    script = edited("train_cpu.sbatch", tmp_path, {"DATA": small_data, "RUN": str(run)},
                    {"ntasks": "2", "cpus-per-task": "1", "time": "00:20:00"})
    job = submit(cluster, script, tmp_path, job_env(cluster, HPCDD_ARGS=SMALL))
    state = cluster.wait_job(job, timeout=600)
    log = open(tmp_path / f"hpcdd-{job}.out").read()
    assert state == "COMPLETED", log[-3000:]
    assert_identical(mpiexec_reference, str(run))


def test_preempted_job_checkpoints_requeues_resumes(cluster, small_data, mpiexec_reference, tmp_path):
    run = tmp_path / "run"
    script = edited("train_cpu.sbatch", tmp_path, {"DATA": small_data, "RUN": str(run)},
                    {"ntasks": "2", "cpus-per-task": "1", "time": "00:20:00"})
    job = submit(cluster, script, tmp_path, job_env(cluster, HPCDD_ARGS=SMALL))
    t0 = time.time()
    while not list((run / "local").glob("sub_*.ckpt.pt")) if (run / "local").exists() else True:
        assert time.time() - t0 < 300, "the job never reached its first checkpoint"
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", job)  # what SLURM does --signal seconds before the time limit
    t0 = time.time()
    requeued = False
    while time.time() - t0 < 300:
        info = cluster.run("scontrol", "show", "job", job, check=False).stdout
        if "Restarts=1" in info:
            requeued = True
            break
        time.sleep(0.5)
    assert requeued, info
    cluster.release_requeued(job)  # instead of SLURM's two-minute hold, once it is safe
    state = cluster.wait_job(job, timeout=600)
    assert state == "COMPLETED", open(tmp_path / f"hpcdd-{job}.out").read()[-3000:] + cluster.ctld_lines(job)
    assert_identical(mpiexec_reference, str(run))
    assert "preempted" not in json.load(open(run / "state.json"))


def test_prepare_and_sweep_array(cluster, fashion_dir, tmp_path):
    data_root = tmp_path / "data"
    data_root.mkdir()
    prep = edited("prepare.sbatch", tmp_path, {"INPUT": fashion_dir, "DATA": str(data_root / "2x2")})
    job = submit(cluster, prep, tmp_path, job_env(
        cluster, HPCDD_PREP_ARGS="--grid 2x2 --overlap 1 --max-train 1500 --max-test 500 --quiet"))
    assert cluster.wait_job(job, timeout=300) == "COMPLETED"
    assert json.load(open(data_root / "2x2" / "manifest.json"))["splits"]["test"] == 500
    runs = tmp_path / "runs"
    sweep = edited("sweep.sbatch", tmp_path, {"DATA_ROOT": str(data_root), "RUN_ROOT": str(runs)},
                   {"array": "0-1", "ntasks": "2", "cpus-per-task": "1", "time": "00:20:00"})
    job = submit(cluster, sweep, tmp_path, job_env(cluster, HPCDD_GRIDS="2x2", HPCDD_ARGS=SMALL))
    t0 = time.time()
    while cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip():
        assert time.time() - t0 < 600, "the array did not finish"
        time.sleep(1)
    for strategy in ("scratch", "transfer"):
        res = json.load(open(runs / f"2x2_{strategy}" / "results.json"))
        methods = [r["method"] for r in res["rows"]]
        assert f"coherent CNN-DNN ({strategy})" in methods and len(methods) == 6, methods


def test_wrong_mpi_plugin_is_named(cluster, small_data, tmp_path):
    proc = cluster.run("srun", "-n", "2", "--mpi=none", sys.executable, "-m", "hpcdd.run", "--data", small_data,
                       "--out", str(tmp_path / "run"), timeout=300, check=False, env=job_env(cluster))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "SLURM_NTASKS=2" in lines[0] and "srun --mpi=pmi2" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_task_count_that_fits_no_rule(cluster, small_data, tmp_path):
    proc = cluster.run("srun", "-n", "6", "--mpi=pmi2", sys.executable, "-m", "hpcdd.run", "--data", small_data,
                       "--out", str(tmp_path / "run"), "--threads", "1", timeout=300, check=False, env=job_env(cluster))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "6 ranks fit neither rule for 4 subdomains" in lines[0], proc.stderr
