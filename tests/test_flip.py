"""The global left-right flip (``augment_flip``) on real ranks: a subdomain's flipped samples are its
mirror's subimages flipped, so a rank reads its mirror shards; the trained models do not depend on
the rank count (1, 2, 4 ranks, bit for bit, unfused) and a killed run resumes to the same bits."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from tests.helpers import assert_identical, finish, kill_all, require_ok, run_python, start, trained_an_epoch, wait_for

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

PHASES = "local,aggregate,coherent,report"
FLIP = ["--threads", "1", "--phases", PHASES, "--set", "local.epochs=2", "--set", "dnn.epochs=10",
        "--set", "coherent.scratch.epochs=2", "--set", "coherent.transfer.epochs=1", "--set", "model.widths=8,16,32",
        "--set", "local.batch_size=32", "--set", "coherent.scratch.batch_size=64", "--set", "performance.fuse_local=off"]
FLIP += [a for t in ("local", "coherent.scratch", "coherent.transfer") for a in ("--set", f"{t}.augment_flip=true")]


@pytest.fixture(scope="module")
def flip_runs(small_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("flip")
    out = {}
    for ranks in (1, 2, 4):
        out[ranks] = base / f"n{ranks}"
        require_ok(run_python(["-m", "hpcdd.run", "--data", small_data, "--out", str(out[ranks]), *FLIP], ranks=ranks,
                              timeout=420))
    return out


def weights(run):
    return {os.path.relpath(p, run): torch.load(p, weights_only=True)
            for p in sorted(glob.glob(os.path.join(run, "**", "*.pt"), recursive=True))}


@pytest.mark.parametrize("ranks", [2, 4])
def test_flipped_training_does_not_depend_on_rank_count(flip_runs, ranks):
    """Local CNNs, DNN and both coherent models are bit-identical on 1, 2 and 4 ranks (on 4 ranks
    every rank reads one mirror shard it does not own; on 2 each owns its mirror)."""
    a, b = weights(flip_runs[1]), weights(flip_runs[ranks])
    assert a.keys() == b.keys() and "local/sub_003.pt" in a and "model.pt" in a
    assert_identical(str(flip_runs[1]), str(flip_runs[ranks]), ignore=("ranks",))


def test_flip_changes_what_is_learned_and_still_learns(small_data, flip_runs, tmp_path):
    """Without the flip, the same run's local CNN 1 differs (the flip is applied), and the flipped
    runs learn: every decomposed model well above chance (0.1)."""
    plain = tmp_path / "plain"
    args = FLIP[:FLIP.index("local.augment_flip=true") - 1]
    args[args.index(PHASES)] = "local"
    require_ok(run_python(["-m", "hpcdd.run", "--data", small_data, "--out", str(plain), *args], ranks=2, timeout=300))
    a = torch.load(plain / "local" / "sub_001.pt", weights_only=True)["model"]
    b = torch.load(flip_runs[2] / "local" / "sub_001.pt", weights_only=True)["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)
    rows = {r["method"]: r for r in json.load(open(flip_runs[4] / "results.json"))["rows"]}
    assert rows["local CNNs (min / mean / max)"]["test"][0] > 0.3, rows
    for method, least in (("CNN-DNN", 0.5), ("coherent CNN-DNN (transfer)", 0.5), ("coherent CNN-DNN (scratch)", 0.3)):
        assert rows[method]["test"] > least, (method, rows[method])  # 2 epochs from scratch: still learning
    assert json.load(open(flip_runs[4] / "config.json"))["local"]["augment_flip"] is True


def test_flipped_run_killed_twice_resumes_bit_identically(flip_runs, tmp_path):
    """SIGKILL after a local CNN's first epoch and after the coherent scratch checkpoints; each
    --resume continues; the end equals the uninterrupted 2-rank run."""
    run = str(tmp_path / "run")
    config = json.load(open(flip_runs[2] / "config.json"))
    proc = start(["--data", config["data"], "--out", run, *FLIP])
    wait_for(proc, lambda: trained_an_epoch(run, "sub_000.ckpt.pt"))
    kill_all(proc)
    proc = start(["--resume", run])
    ckpts = [os.path.join(run, "coherent", "scratch", f"rank_{r:04d}.ckpt.pt") for r in (0, 1)]
    wait_for(proc, lambda: all(os.path.exists(c) for c in ckpts))
    kill_all(proc)
    code, out, err = finish(start(["--resume", run]))
    assert code == 0, err[-3000:]
    resumed = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert any(e.get("event") == "resume" and e["phase"] == "local" and e["epoch"] >= 1 for e in resumed)
    assert_identical(str(flip_runs[2]), run)
