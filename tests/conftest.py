"""Shared fixtures: real Fashion-MNIST, prepared shards, and a launcher for real MPI ranks."""

from __future__ import annotations

import os

import pytest

from tests.helpers import FASHION, RUNNING, prepare


@pytest.fixture(scope="session")
def fashion_dir() -> str:
    if not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")):
        if os.environ.get("HPCDD_REQUIRE_DATA", "1") == "1":
            pytest.fail(f"Fashion-MNIST not found in {FASHION}: apt-get install dataset-fashion-mnist "
                        f"(or set HPCDD_REQUIRE_DATA=0 to skip)")
        pytest.skip("Fashion-MNIST not installed")
    return FASHION


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, fashion_dir) -> str:
    """2x2 grid, overlap 1, 2000 training images (1800 train / 200 val), 1000 test images."""
    out = tmp_path_factory.mktemp("data") / "fm22"
    prepare(fashion_dir, out)
    return str(out)


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


@pytest.fixture(autouse=True)
def running_test(request):
    """The running test, for helpers that check its markers (``helpers.require_marker``)."""
    RUNNING["node"] = request.node
    yield
    RUNNING.pop("node", None)


def pytest_collection_modifyitems(config, items):
    """A test that uses a SLURM cluster fixture must be marked ``slurm`` (and ``mpi``): markers say
    what a test starts, so that ``-m "not mpi and not slurm"`` selects the single-process layer."""
    for item in items:
        if {"cluster", "cluster2"} & set(item.fixturenames):
            missing = [m for m in ("slurm", "mpi") if item.get_closest_marker(m) is None]
            if missing:
                raise pytest.UsageError(f"{item.nodeid} uses a SLURM cluster but is not marked {', '.join(missing)}")
