"""hpcdd.run refuses bad input before any training: one line, exit status 2, nothing written."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import run_python


def hpcdd_run(*args, ranks=None):
    return run_python(["-m", "hpcdd.run", *map(str, args)], ranks=ranks, timeout=120)


def assert_user_error(proc, needle):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needle", [
    (["--set", "local.epoch=3"], "did you mean 'local.epochs'"),
    (["--set", "local.epochs=three"], "expected int"),
    (["--epochs", "0"], "local.epochs = 0: expected a positive number of epochs"),
    (["--set", "local.batch_size=0"], "expected a positive batch size"),
    (["--set", "model.family=alexnet"], "model.family = 'alexnet'"),
    (["--phases", "local,everything"], "unknown phase 'everything'"),
    (["--set", "num_classes=7"], "num_classes = 7 but"),
    (["--set", "local.augment_shift=2"], "needs shards stored with --margin >= 2"),
    (["--phases", "coherent"], "needs the local and aggregate phases"),
    (["--phases", "aggregate"], "needs the local phase"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_configuration(small_data, tmp_path, args, needle):
    proc = hpcdd_run("--data", small_data, "--out", tmp_path / "run", *args)
    assert_user_error(proc, needle)
    assert not (tmp_path / "run").exists()


def test_config_file_errors(small_data, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[local]\nepochs = 2\nlearning_rate = 0.1\n")
    proc = hpcdd_run("--config", bad, "--data", small_data, "--out", tmp_path / "run")
    assert_user_error(proc, "bad.toml: unknown config key 'local.learning_rate'")
    assert_user_error(hpcdd_run("--config", tmp_path / "none.toml", "--out", tmp_path / "r"), "no such file")
    assert_user_error(hpcdd_run("--out", tmp_path / "r"), "--data: missing")


def test_existing_run_directory_is_kept(small_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    proc = hpcdd_run("--data", small_data, "--out", run, ranks=2)
    assert_user_error(proc, "already exists")
    assert (run / "precious.txt").read_text() == "keep me"


def test_missing_and_mismatched_shards_on_every_rank(small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    os.unlink(data / "sub_003.h5")  # owned by rank 1 of 2: rank 0 must stop too, with the same line
    proc = hpcdd_run("--data", data, "--out", tmp_path / "run", "--threads", "1", ranks=2)
    assert_user_error(proc, "sub_003.h5: missing shard")
    assert not (tmp_path / "run").exists()
    with open(data / "sub_000.h5", "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    proc = hpcdd_run("--data", data, "--out", tmp_path / "run", "--threads", "1")
    assert_user_error(proc, "sub_000.h5: not a readable HDF5 file")
    assert_user_error(hpcdd_run("--data", tmp_path / "nowhere", "--out", tmp_path / "run"), "no such directory")


def test_help_needs_no_mpi():
    proc = run_python(["-c", "import sys; sys.modules['mpi4py'] = None; from hpcdd.run import main; main(['--help'])"])
    assert proc.returncode == 0 and "--resume" in proc.stdout
