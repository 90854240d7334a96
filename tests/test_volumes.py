"""3D end to end on real volumes: AdrenalMNIST3D (tests/data, CC BY 4.0), 2x2x2 subdomains, every phase,
real MPI ranks. Two imbalanced classes (about 78 % normal): the report gives balanced accuracy and AUC,
and the decomposed models must beat always-normal on balanced accuracy, not just on accuracy."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import ROOT, require_ok, run_python

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

ADRENAL = os.path.join(ROOT, "tests", "data", "adrenalmnist3d_28.npz")
ARGS = ["--threads", "1", "--set", "model.widths=16,32,64", "--set", "local.epochs=5", "--set", "local.batch_size=32",
        "--set", "dnn.epochs=30", "--set", "global.epochs=3", "--set", "global.batch_size=32",
        "--set", "coherent.scratch.epochs=2", "--set", "coherent.scratch.batch_size=32",
        "--set", "coherent.transfer.epochs=2", "--set", "coherent.transfer.batch_size=32",
        "--set", "performance.fuse_local=off"]


@pytest.fixture(scope="module")
def adrenal(tmp_path_factory):
    from data_prep.cli import run

    out = tmp_path_factory.mktemp("adrenal") / "a222"
    run(["npz", ADRENAL, str(out), "--volume", "--grid", "2x2x2", "--name", "adrenalmnist3d", "--quiet"])
    return str(out)


@pytest.fixture(scope="module")
def volume_runs(adrenal, tmp_path_factory):
    base = tmp_path_factory.mktemp("vruns")
    runs = {}
    for ranks, phases in ((4, "local,aggregate,coherent,global,report"), (1, "local,aggregate,report")):
        out = base / f"n{ranks}"
        require_ok(run_python(["-m", "hpcdd.run", "--data", adrenal, "--out", str(out), "--phases", phases, *ARGS],
                              ranks=ranks, timeout=900))
        runs[ranks] = out
    return runs


def _rows(run):
    return {r["method"]: r for r in json.load(open(run / "results.json"))["rows"]}


def test_every_phase_learns_on_real_volumes(volume_runs):
    res = json.load(open(volume_runs[4] / "results.json"))
    rows = _rows(volume_runs[4])
    assert res["test_class_counts"] == [229, 69] and res["image_shape"] == [1, 28, 28, 28]
    # always-normal scores accuracy 0.77, balanced accuracy 0.5 and AUC 0.5; measured here 0.63 / 0.79 (CNN-DNN)
    for method in ("CNN-DNN", "coherent CNN-DNN (transfer)"):
        assert rows[method]["test_balanced"] > 0.58 and rows[method]["test_auc"] > 0.72, (method, rows[method])
    for method in ("global CNN", "average probability"):  # the global CNN's 3 epochs: AUC 0.87, balanced 0.53
        assert rows[method]["test_auc"] > 0.72, (method, rows[method])
    md = (volume_runs[4] / "results.md").read_text()
    assert "| method | val accuracy | test accuracy | test balanced accuracy | test AUC |" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| CNN-DNN |"))
    assert f"{rows['CNN-DNN']['test_balanced']:.4f}" in line and f"{rows['CNN-DNN']['test_auc']:.4f}" in line


def test_local_cnns_and_aggregators_are_the_same_on_1_and_4_ranks(volume_runs):
    """Unfused, one thread per rank: the 3D local CNNs, the DNN and every decomposed row are bit-identical."""
    one, four = volume_runs[1], volume_runs[4]
    for i in range(8):
        a = torch.load(one / "local" / f"sub_{i:03d}.pt", weights_only=True)["model"]
        b = torch.load(four / "local" / f"sub_{i:03d}.pt", weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
    for method in ("local CNNs (min / mean / max)", "average probability", "majority vote", "CNN-DNN"):
        ra, rb = _rows(one)[method], _rows(four)[method]
        for key in ("val", "test", "test_balanced", "test_auc"):
            assert ra[key] == rb[key], (method, key)
