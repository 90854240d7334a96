"""The second MPI family: Debian's Open MPI, through the same mpi4py wheel (MPI4PY_MPIABI=openmpi).

MPICH (pip's ``mpich``) is what the rest of the suite uses; most clusters run Open MPI. Here
``mpirun`` end to end against the MPICH run, abort of a failing rank, and (on two emulated nodes)
``srun --mpi=pmix`` and the message for the wrong plugin.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT, SMALL, assert_identical, env_for_tests, job_env, require_ok, run_python
from tests.test_multinode import cluster2  # noqa: F401,F811 - the two-node cluster fixture

pytestmark = [pytest.mark.mpi]

MPIRUN = "/usr/bin/mpirun.openmpi"
OPENMPI = {"MPI4PY_MPIABI": "openmpi", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


@pytest.fixture(scope="module")
def openmpi():
    if not os.path.exists(MPIRUN):
        pytest.skip("Open MPI not installed (apt-get install openmpi-bin; .ci/run does)")  # a failure in CI
    return MPIRUN


def mpirun(args, ranks, timeout=600, **extra):
    return subprocess.run([MPIRUN, "-n", str(ranks), sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env_for_tests(**OPENMPI, **extra), cwd=ROOT)


def library(run) -> str:
    return json.load(open(os.path.join(run, "config.json")))["meta"]["software"]["MPI library"]


@pytest.fixture(scope="module")
def mpich_run(small_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("mpich") / "run"
    require_ok(run_python(["-m", "hpcdd.run", "--data", small_data, "--out", str(run), "--threads", "1",
                           *SMALL.split()], ranks=4, timeout=600))
    return str(run)


def test_mpirun_end_to_end_equals_mpich(openmpi, small_data, mpich_run, tmp_path):
    """Every phase under Open MPI ends bit-identical to the same run under MPICH: weights, gathered
    outputs, results (4 ranks; the data-parallel sums of 4 workers came out the same in both)."""
    run = tmp_path / "run"
    require_ok(mpirun(["-m", "hpcdd.run", "--data", small_data, "--out", run, "--threads", "1", *SMALL.split()], 4))
    assert library(str(run)).startswith("Open MPI") and library(mpich_run).startswith("MPICH")
    for split in ("train", "test"):
        a = np.load(os.path.join(mpich_run, "aggregate", f"probs_{split}.npz"))
        b = np.load(run / "aggregate" / f"probs_{split}.npz")
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert_identical(mpich_run, str(run))


def test_failing_rank_aborts_every_rank_under_openmpi(openmpi, small_data, tmp_path):
    proc = mpirun(["tests/mpi/fail_rank.py", "--data", small_data, "--out", tmp_path / "r", "--threads", "1",
                   *SMALL.split()], 4, timeout=180, FAIL_RANK="2")
    ended = time.time()
    assert proc.returncode != 0
    assert "rank 2 failed with RuntimeError: injected failure" in proc.stderr, proc.stderr[-3000:]
    assert open(tmp_path / "r" / "FAILED").read().startswith("hpcdd: rank 2 failed with RuntimeError")
    assert ended - os.stat(tmp_path / "r" / "FAILED").st_mtime < 20  # from the failure to the end of every rank


@pytest.mark.slurm
def test_srun_pmix_on_two_nodes(openmpi, cluster2, small_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    proc = cluster2.run("srun", "-N", "2", "-n", "4", "--ntasks-per-node=2", "--mpi=pmix", "--kill-on-bad-exit=1",
                        sys.executable, "-m", "hpcdd.run", "--data", small_data, "--out", str(run),
                        "--phases", "local,aggregate,report", *SMALL.split(), timeout=600, check=False,
                        env=job_env(cluster2, MPI4PY_MPIABI="openmpi"))
    require_ok(proc)
    assert library(str(run)).startswith("Open MPI")
    assert [r["host"] for r in json.load(open(run / "ranks.json"))["ranks"]] == ["node1", "node1", "node2", "node2"]
    assert len(glob.glob(str(run / "local" / "sub_*.pt"))) == 4


@pytest.mark.slurm
def test_wrong_plugin_with_openmpi_is_named(openmpi, cluster2, small_data, tmp_path):  # noqa: F811
    """Open MPI cannot start singletons under srun's pmi2 and exits inside MPI_Init with its own
    message; the rank's watcher adds which plugin to use (MPICH with the wrong plugin: test_slurm)."""
    proc = cluster2.run("srun", "-N", "2", "-n", "4", "--ntasks-per-node=2", "--mpi=pmi2", sys.executable, "-m",
                        "hpcdd.run", "--data", small_data, "--out", str(tmp_path / "run"), timeout=300, check=False,
                        env=job_env(cluster2, MPI4PY_MPIABI="openmpi"))
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "ended inside MPI initialisation" in proc.stderr and "`srun --mpi=pmix` for Open MPI" in proc.stderr, \
        proc.stderr[-3000:]
    assert "killed by a signal" not in proc.stderr
    assert not (tmp_path / "run").exists()
