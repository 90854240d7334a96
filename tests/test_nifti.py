"""The NIfTI source: real .nii / .nii.gz files written by nibabel from AdrenalMNIST3D volumes (tests/data),
one folder per class; streamed like the image folder, byte-identical for any number of workers."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from tests.helpers import ROOT, run_python, shard_digest

nib = pytest.importorskip("nibabel")

ADRENAL = os.path.join(ROOT, "tests", "data", "adrenalmnist3d_28.npz")


def prep(*args):
    return run_python(["-m", "data_prep", *map(str, args), "--quiet"], timeout=300)


def one_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """train/ and test/ folders of NIfTI files (int16, CT-like units: 4 x mask - 500, spacing 1.5 x 1.5 x 2 mm),
    half gzipped; each file named by its volume's index in the npz."""
    d = np.load(ADRENAL)
    root = tmp_path_factory.mktemp("nifti") / "adrenal"
    for split, xs, ys in (("train", d["x"][:150], d["y"][:150]), ("test", d["x_test"][:40], d["y_test"][:40])):
        for j, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / str(d["classes"][y])
            folder.mkdir(parents=True, exist_ok=True)
            image = nib.Nifti1Image(x.astype(np.int16) * 4 - 500, np.diag([1.5, 1.5, 2.0, 1.0]))
            nib.save(image, str(folder / f"{j:04d}.nii{'.gz' if j % 2 else ''}"))
    return root, d


def stored(out, split: str):
    with h5py.File(out / "full.h5") as f:
        return f[split]["x"][:], f[split]["sample_id"][:]


@pytest.mark.slow
def test_volumes_as_stored_windowed_to_0_1(volumes, tmp_path):
    root, d = volumes
    out = tmp_path / "out"
    proc = prep("nifti", root, out, "--size", "28", "28", "28", "--window", "-500", "520", "--grid", "2x2x2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.load(open(out / "manifest.json"))
    assert m["image_shape"] == [1, 28, 28, 28] and m["dtype"] == "float32" and m["classes"] == ["hyperplasia", "normal"]
    assert m["voxel_spacing"]["source_min"] == [1.5, 1.5, 2.0] and m["window"] == [-500.0, 520.0]
    assert m["orientation"].startswith("as stored")
    files = [f for c in m["classes"] for f in sorted(os.listdir(root / "train" / c))]
    x, ids = stored(out, "train")
    for row, sid in zip(x[:40], ids[:40]):  # sample id -> file -> the npz volume it was written from
        j = int(files[sid].split(".")[0])
        np.testing.assert_allclose(row[0], d["x"][j] / 255.0, atol=1e-6)  # masks 0/255 -> -500/520 -> 0/1
    assert m["splits"]["test"] == 40


@pytest.mark.slow
def test_resampled_and_byte_identical_for_any_workers(volumes, tmp_path):
    root, _ = volumes
    common = ["nifti", root, None, "--size", "16", "20", "24", "--grid", "2x2x2", "--overlap", "1"]
    for name, extra in (("one", ["--workers", "1"]), ("two", ["--workers", "2", "--chunk-mb", "0.05"])):
        args = list(common)
        args[2] = tmp_path / name
        assert prep(*args, *extra).returncode == 0
    assert shard_digest(tmp_path / "one") == shard_digest(tmp_path / "two")
    x, _ = stored(tmp_path / "one", "train")
    assert x.shape[1:] == (1, 16, 20, 24) and x.dtype == np.float32
    assert x.min() >= -500 and x.max() <= 520  # no window: the stored values (trilinear keeps their range)


@pytest.mark.slow
def test_bad_volumes_and_options_are_one_line(volumes, tmp_path):
    root, d = volumes
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        for j in range(12):
            nib.save(nib.Nifti1Image(d["x"][j].astype(np.float32), np.eye(4)), str(bad / c / f"{j}.nii.gz"))
    size = ["--size", "28", "28", "28", "--grid", "2x2x2"]
    # a truncated .nii.gz: named, nothing left; --skip-bad skips and lists it
    data = (bad / "b" / "3.nii.gz").read_bytes()
    (bad / "b" / "3.nii.gz").write_bytes(data[: len(data) // 2])
    assert f"{bad}/b/3.nii.gz: cannot read NIfTI volume" in one_line(prep("nifti", bad, tmp_path / "o", *size))
    assert sorted(os.listdir(tmp_path)) == ["bad"]
    proc = prep("nifti", bad, tmp_path / "skipped", *size, "--skip-bad")
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = json.load(open(tmp_path / "skipped" / "manifest.json"))["skipped"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}/b/3.nii.gz: cannot read NIfTI volume")
    os.unlink(bad / "b" / "3.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((28, 28, 28, 3), np.float32), np.eye(4)), str(bad / "b" / "4d.nii"))
    assert "4d.nii: a 4D image of shape (28, 28, 28, 3); expected a 3D volume" in one_line(
        prep("nifti", bad, tmp_path / "o", *size))
    os.unlink(bad / "b" / "4d.nii")
    nib.save(nib.Nifti1Image(np.zeros((28, 28), np.float32), np.eye(4)), str(bad / "b" / "flat.nii"))
    assert "flat.nii: a 2D image of shape (28, 28); expected a 3D volume" in one_line(
        prep("nifti", bad, tmp_path / "o", *size))
    os.unlink(bad / "b" / "flat.nii")
    for args, needle in ((["--size", "28", "0", "28"], "--size 28 0 28: the nifti source needs D H W, three positive"),
                         (["--size", "28", "28"], "--size 28 28: the nifti source needs D H W"),
                         (["--size", "8", "8", "8", "--window", "400", "-1000"], "--window 400 -1000: expected LOW < HIGH"),
                         (["--size", "8", "8", "8", "--window", "5", "5"], "--window 5 5: expected LOW < HIGH")):
        assert needle in one_line(prep("nifti", bad, tmp_path / "o", *args, "--grid", "2x2x2"))
    assert "--grid 2x2 has 2 counts but the data are 3D volumes" in one_line(
        prep("nifti", bad, tmp_path / "o", "--size", "8", "8", "8", "--grid", "2x2"))
    lone = tmp_path / "lone"
    (lone / "a").mkdir(parents=True)
    for j in range(6):
        nib.save(nib.Nifti1Image(d["x"][j].astype(np.float32), np.eye(4)), str(lone / "a" / f"{j}.nii"))
    assert "1 class (a); a classifier needs at least 2" in one_line(prep("nifti", lone, tmp_path / "o", *size))
    assert sorted(os.listdir(tmp_path)) == ["bad", "lone", "skipped"]
