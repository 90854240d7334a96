"""data_prep on real files of every supported format, and its refusal of bad input."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import struct

import h5py
import numpy as np
import pytest

from tests.helpers import cifar_pickles, env_for_tests, fashion_images, mounted_tmpfs, require_ok, run_python


def write_idx(path, array, gz=True):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def fashion_small(fashion_dir):
    """The first 600 training and 200 test images of real Fashion-MNIST."""
    return fashion_images(fashion_dir, 600, 200)


def prep(*args):
    return run_python(["-m", "data_prep", *map(str, args)], timeout=120)


def check_layout(out, grid, n_sub, splits_total, channels=1):
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["grid"] == list(grid) and len(m["shards"]) == n_sub
    assert sum(m["splits"].values()) == splits_total
    assert len(m["mean"]) == channels and all(s > 0 for s in m["std"])
    for i, name in enumerate(m["shards"]):
        with h5py.File(os.path.join(out, name), "r") as f:
            assert list(f.attrs["box"].reshape(-1)) == [v for ab in m["boxes"][i] for v in ab]
            assert f.attrs["prep_id"] == m["prep_id"]
            for split, n in m["splits"].items():
                assert f[split]["x"].shape[0] == n and f[split]["x"].chunks[0] <= 256
                assert f[split]["sample_id"].shape == (n,)
    return m


def test_idx_real_fashion_mnist_gz(tmp_path, fashion_dir):
    proc = prep("idx", fashion_dir, tmp_path / "out", "--grid", "4x4", "--overlap", "2", "--max-train", "3000",
                "--max-test", "500", "--val-fraction", "0.1")
    require_ok(proc)
    m = check_layout(tmp_path / "out", (4, 4), 16, 3500)
    assert m["splits"]["test"] == 500 and abs(m["splits"]["val"] - 300) <= 5  # stratified, rounded per class
    assert m["classes"][0] == "T-shirt/top" and m["dtype"] == "uint8"
    assert "sub_015.h5" in proc.stdout  # the printed layout summary
    # validation split is stratified: every class has about 10 %
    with h5py.File(tmp_path / "out" / "sub_000.h5", "r") as f:
        counts = np.bincount(f["val"]["y"][:], minlength=10)
    assert counts.min() >= 20


def test_idx_raw_files_and_stats(tmp_path, fashion_small):
    x, y, xt, yt = fashion_small
    src = tmp_path / "raw"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte", x, gz=False)
    write_idx(src / "train-labels-idx1-ubyte", y, gz=False)
    write_idx(src / "t10k-images-idx3-ubyte", xt, gz=False)
    write_idx(src / "t10k-labels-idx1-ubyte", yt, gz=False)
    require_ok(prep("idx", src, tmp_path / "out", "--grid", "2x2", "--val-fraction", "0.2", "--seed", "3"))
    m = check_layout(tmp_path / "out", (2, 2), 4, 800)
    with h5py.File(tmp_path / "out" / "full.h5", "r") as f:
        tr = f["train"]["x"][:].astype(np.float64) / 255
    assert abs(m["mean"][0] - tr.mean()) < 1e-6 and abs(m["std"][0] - tr.std()) < 1e-6


def test_cifar10_pickles(tmp_path, fashion_small):
    """torchvision's cifar-10-batches-py layout, holding real (Fashion-MNIST) pixels as 3x32x32."""
    x, y, xt, yt = fashion_small
    rgb = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1)
    src = tmp_path / "cifar-10-batches-py"
    cifar_pickles(src, rgb[:500], y[:500], rgb[500:], y[500:], [f"c{k}" for k in range(10)])
    require_ok(prep("cifar10", src, tmp_path / "out", "--grid", "2x2", "--overlap", "2"))
    m = check_layout(tmp_path / "out", (2, 2), 4, 600, channels=3)
    assert m["image_shape"] == [3, 32, 32] and m["classes"][3] == "c3"
    with h5py.File(tmp_path / "out" / "sub_003.h5", "r") as f:
        ids = f["train"]["sample_id"][:]
        np.testing.assert_array_equal(f["train"]["x"][:], rgb[ids][:, :, 14:32, 14:32])


@pytest.mark.slow
def test_imagefolder_png_jpeg_single_split(tmp_path, fashion_small):
    from PIL import Image

    x, y, _, _ = fashion_small
    src = tmp_path / "flowers"
    for k in range(3):
        (src / f"class_{k}").mkdir(parents=True)
    for j in range(90):
        k = j % 3
        im = Image.fromarray(x[j]).convert("RGB")
        ext = "png" if j % 2 else "jpg"
        im.resize((40 + j % 5, 36)).save(src / f"class_{k}" / f"img_{j}.{ext}")
    require_ok(prep("imagefolder", src, tmp_path / "out", "--grid", "2x2", "--size", "32", "32",
                    "--test-fraction", "0.2", "--val-fraction", "0.25"))
    m = check_layout(tmp_path / "out", (2, 2), 4, 90, channels=3)
    assert m["splits"]["test"] == 18 and m["classes"] == ["class_0", "class_1", "class_2"]
    # deterministic: a second preparation gives the same split and the same prep id
    require_ok(prep("imagefolder", src, tmp_path / "out2", "--grid", "2x2", "--size", "32", "32",
                    "--test-fraction", "0.2", "--val-fraction", "0.25"))
    m2 = json.load(open(tmp_path / "out2" / "manifest.json"))
    assert m2["prep_id"] == m["prep_id"] and m2["sample_ids_sha256"] == m["sample_ids_sha256"]
    # PNG is lossless: a stored png image equals the source pixels after a bilinear, antialiased resize
    # (torchvision's, which data_prep uses, and PIL's agree within one grey level)
    with h5py.File(tmp_path / "out" / "full.h5", "r") as f:
        assert f["train"]["x"].shape[1:] == (3, 32, 32)
        stored = {int(i): x_ for i, x_ in zip(f["train"]["sample_id"][:], f["train"]["x"][:])}
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*.*"))
    checked = 0
    for sid, pixels in stored.items():
        name = files[sid] if sid < len(files) else None
        if name and name.endswith(".png"):
            with Image.open(src / name) as im:
                expected = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
            np.testing.assert_allclose(pixels.astype(int), expected.astype(int), atol=1, err_msg=name)
            checked += 1
    assert checked >= 10


@pytest.mark.slow
def test_imagefolder_presplit_grey(tmp_path, fashion_small):
    from PIL import Image

    x, y, _, _ = fashion_small
    for split, rng in (("train", range(0, 40)), ("test", range(40, 60))):
        for j in rng:
            d = tmp_path / "src" / split / f"k{j % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[j]).save(d / f"{j}.png")
    require_ok(prep("imagefolder", tmp_path / "src", tmp_path / "out", "--grid", "2x1", "--channels", "1",
                    "--val-fraction", "0.25"))
    m = check_layout(tmp_path / "out", (2, 1), 2, 60)
    assert m["splits"]["test"] == 20
    with h5py.File(tmp_path / "out" / "full.h5", "r") as f:
        ids = f["test"]["sample_id"][:] - 40
        in_folder_order = sorted(range(40, 60), key=lambda j: (j % 2, str(j)))  # class folder, then file name
        np.testing.assert_array_equal(f["test"]["x"][:, 0], x[np.array(in_folder_order)[ids]])


def test_npz_2d_and_3d_volumes(tmp_path, fashion_small):
    x, y, xt, yt = fashion_small
    np.savez(tmp_path / "img.npz", x=x[..., None], y=y, x_test=xt[..., None], y_test=yt)
    require_ok(prep("npz", tmp_path / "img.npz", tmp_path / "o2", "--grid", "2x2", "--margin", "2"))
    m = check_layout(tmp_path / "o2", (2, 2), 4, 800)
    assert m["margin"] == 2
    with h5py.File(tmp_path / "o2" / "sub_000.h5", "r") as f:
        assert f["train"]["x"].shape[2:] == (14 + 4, 14 + 4)
    # CT-like float volumes (n, D, H, W): stacks of real images, label = class of the middle slice
    vol = np.stack([x[i:i + 8] for i in range(0, 400, 2)]).astype(np.float32) - 100.0
    lab = y[np.arange(0, 400, 2) + 4]
    np.savez(tmp_path / "vol.npz", x=vol, y=lab)
    require_ok(prep("npz", tmp_path / "vol.npz", tmp_path / "o3", "--grid", "2x2x2", "--overlap", "1",
                    "--volume", "--test-fraction", "0.25"))
    m = check_layout(tmp_path / "o3", (2, 2, 2), 8, 200)
    assert m["image_shape"] == [1, 8, 28, 28] and m["dtype"] == "float32" and m["scale"] == 1.0
    with h5py.File(tmp_path / "o3" / "sub_007.h5", "r") as f:
        ids = f["test"]["sample_id"][:]
        np.testing.assert_allclose(f["test"]["x"][:, 0], vol[ids][:, 3:, 13:, 13:])


def test_force_replaces_existing_output(tmp_path, fashion_small):
    x, y, _, _ = fashion_small
    np.savez(tmp_path / "a.npz", x=x, y=y)
    out = tmp_path / "out"
    require_ok(prep("npz", tmp_path / "a.npz", out, "--grid", "2x2"))
    require_ok(prep("npz", tmp_path / "a.npz", out, "--grid", "4x4", "--force"))
    assert json.load(open(out / "manifest.json"))["grid"] == [4, 4]
    assert os.path.exists(out / "sub_015.h5")
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


# ------------------------------------------------------------------------------- bad input
def _bad_inputs(tmp, fashion_dir, x, y):
    """(name, args) pairs, each a mistake a user makes; every one must be refused with exit 2."""
    cases = []
    good = tmp / "good"
    good.mkdir()
    write_idx(good / "train-images-idx3-ubyte.gz", x)
    write_idx(good / "train-labels-idx1-ubyte.gz", y)
    cases.append(("missing input", ["idx", tmp / "nope", tmp / "o"]))
    trunc = tmp / "trunc"
    trunc.mkdir()
    with open(trunc / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(open(good / "train-images-idx3-ubyte.gz", "rb").read()[:5000])
    write_idx(trunc / "train-labels-idx1-ubyte.gz", y)
    cases.append(("truncated gzip", ["idx", trunc, tmp / "o"]))
    short = tmp / "short"
    short.mkdir()
    data = gzip.decompress(open(good / "train-images-idx3-ubyte.gz", "rb").read())[:-100]
    open(short / "train-images-idx3-ubyte", "wb").write(data)
    write_idx(short / "train-labels-idx1-ubyte.gz", y)
    cases.append(("truncated idx", ["idx", short, tmp / "o"]))
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    open(corrupt / "train-images-idx3-ubyte", "wb").write(b"\x89PNG not an idx file" * 10)
    write_idx(corrupt / "train-labels-idx1-ubyte.gz", y)
    cases.append(("corrupt idx", ["idx", corrupt, tmp / "o"]))
    counts = tmp / "counts"
    counts.mkdir()
    write_idx(counts / "train-images-idx3-ubyte.gz", x)
    write_idx(counts / "train-labels-idx1-ubyte.gz", y[:-7])
    cases.append(("count mismatch", ["idx", counts, tmp / "o"]))
    rng_ = tmp / "range"
    rng_.mkdir()
    write_idx(rng_ / "train-images-idx3-ubyte.gz", x)
    write_idx(rng_ / "train-labels-idx1-ubyte.gz", np.where(np.arange(len(y)) == 3, 12, y))
    cases.append(("label out of range", ["idx", rng_, tmp / "o"]))
    np.savez(tmp / "float_labels.npz", x=x, y=y + 0.5)
    cases.append(("non-integer labels", ["npz", tmp / "float_labels.npz", tmp / "o"]))
    np.savez(tmp / "neg_labels.npz", x=x, y=y.astype(int) - 1)
    cases.append(("negative labels", ["npz", tmp / "neg_labels.npz", tmp / "o"]))
    ragged = np.empty(3, dtype=object)
    ragged[:] = [np.zeros((28, 28)), np.zeros((30, 28)), np.zeros((28, 28))]
    np.savez(tmp / "ragged.npz", x=ragged, y=np.array([0, 1, 0]))
    cases.append(("images of different sizes", ["npz", tmp / "ragged.npz", tmp / "o"]))
    np.savez(tmp / "testsize.npz", x=x, y=y, x_test=x[:10, :20], y_test=y[:10])
    cases.append(("test images of another size", ["npz", tmp / "testsize.npz", tmp / "o"]))
    np.savez(tmp / "noy.npz", x=x)
    cases.append(("npz without labels", ["npz", tmp / "noy.npz", tmp / "o"]))
    np.savez(tmp / "nan.npz", x=np.where(x > 250, np.nan, x.astype(np.float32)), y=y)
    cases.append(("NaN pixels", ["npz", tmp / "nan.npz", tmp / "o"]))
    open(tmp / "junk.npz", "wb").write(b"PK\x03\x04 truncated zip")
    cases.append(("corrupt npz", ["npz", tmp / "junk.npz", tmp / "o"]))
    cases.append(("grid too fine", ["idx", good, tmp / "o", "--grid", "29x1"]))
    cases.append(("overlap too wide", ["idx", good, tmp / "o", "--grid", "4x4", "--overlap", "7"]))
    cases.append(("3D grid on 2D images", ["idx", good, tmp / "o", "--grid", "2x2x2"]))
    cases.append(("malformed grid", ["idx", good, tmp / "o", "--grid", "four"]))
    cases.append(("bad val fraction", ["idx", good, tmp / "o", "--val-fraction", "1.5"]))
    folder = tmp / "folder"
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(x[0]).save(folder / "cat" / "a.png")
    cases.append(("empty class folder", ["imagefolder", folder, tmp / "o"]))
    broken = tmp / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "b").mkdir(parents=True)
    Image.fromarray(x[0]).save(broken / "a" / "ok.png")
    open(broken / "b" / "bad.jpg", "wb").write(b"\xff\xd8\xff not really a jpeg")
    cases.append(("undecodable image", ["imagefolder", broken, tmp / "o"]))
    cifar = tmp / "cifar"
    cifar.mkdir()
    open(cifar / "batches.meta", "wb").write(pickle.dumps({b"label_names": [b"a"] * 10})[:20])
    cases.append(("corrupt cifar pickle", ["cifar10", cifar, tmp / "o"]))
    cases.append(("unknown source", ["tfrecord", good, tmp / "o"]))
    cases.append(("absurd size", ["imagefolder", broken, tmp / "o", "--size", "100000", "100000"]))
    np.savez(tmp / "one.npz", x=x[:1], y=y[:1])
    cases.append(("a single sample", ["npz", tmp / "one.npz", tmp / "o"]))
    open(tmp / "text.npz", "w").write("x,y\n1,2\n")
    cases.append(("text named .npz", ["npz", tmp / "text.npz", tmp / "o"]))
    (tmp / "exists").mkdir()
    (tmp / "exists" / "keep.txt").write_text("user data")
    cases.append(("output exists", ["idx", good, tmp / "exists"]))
    cases.append(("force on a user folder", ["idx", good, tmp / "exists", "--force"]))
    cases.append(("force on the input folder", ["idx", good, good, "--force"]))
    pics = tmp / "pics"  # a valid image folder
    for k in range(2):
        (pics / f"c{k}").mkdir(parents=True)
        for j in range(10):
            Image.fromarray(x[k * 10 + j]).save(pics / f"c{k}" / f"{j}.png")
    cases.append(("output inside the input folder", ["imagefolder", pics, pics / "shards"]))
    one = tmp / "oneclass"
    (one / "cat").mkdir(parents=True)
    for j in range(20):
        Image.fromarray(x[j]).save(one / "cat" / f"{j}.png")
    cases.append(("one class", ["imagefolder", one, tmp / "o"]))
    from data_prep.cli import run

    run(["idx", str(good), str(tmp / "prepared"), "--grid", "2x2", "--quiet"])
    (tmp / "prepared" / "run").mkdir()  # a user's run directory kept beside the shards
    (tmp / "prepared" / "run" / "keep.txt").write_text("user data")
    cases.append(("force over a preparation that holds a run", ["idx", good, tmp / "prepared", "--force"]))
    return [(name, args if "--grid" in args else args + ["--grid", "2x2"]) for name, args in cases]


# every case: the fragment its one-line message must hold ({tmp}: the folder the inputs are in)
BAD_INPUT_MESSAGES = {
    "missing input": "INPUT {tmp}/nope: no such file or directory",
    "truncated gzip": "trunc/train-images-idx3-ubyte.gz: corrupt or truncated gzip file",
    "truncated idx": "short/train-images-idx3-ubyte: truncated or corrupt: header says shape (100, 28, 28)",
    "corrupt idx": "corrupt/train-images-idx3-ubyte: not an IDX file (bad magic number)",
    "count mismatch": "100 images but 93 labels",
    "label out of range": "labels out of range: found 12, expected 0..9",
    "non-integer labels": "float_labels.npz (y): labels must be integers",
    "negative labels": "neg_labels.npz (y): labels out of range: found -1",
    "images of different sizes": "ragged.npz: x holds images of different sizes",
    "test images of another size": "testsize.npz: x_test images have shape (1, 20, 28) but x images (1, 28, 28)",
    "npz without labels": "noy.npz: missing array 'y'",
    "NaN pixels": "nan.npz: x contains NaN or Inf values",
    "corrupt npz": "junk.npz: not a readable .npz file",
    "grid too fine": "--grid 29x1: the image height 28 cannot be split into 29 parts",
    "overlap too wide": "--overlap 7: must be smaller than the smallest subdomain height",
    "3D grid on 2D images": "--grid 2x2x2 has 3 counts but the data are 2D images",
    "malformed grid": "--grid 'four': expected NYxNX",
    "bad val fraction": "--val-fraction 1.5: expected a fraction between 0 and 1",
    "empty class folder": "folder/dog: empty class folder",
    "undecodable image": "broken/b/bad.jpg: cannot decode image",
    "corrupt cifar pickle": "cifar/batches.meta: corrupt or truncated pickle",
    "unknown source": "invalid choice: 'tfrecord'",
    "absurd size": "broken: one image of 3x100000x100000 needs 90.0 GB in memory",
    "a single sample": "the val split is empty",
    "text named .npz": "text.npz: not a readable .npz file",
    "output exists": "{tmp}/exists: already exists",
    "force on a user folder": "{tmp}/exists --force: not a data_prep output",
    "force on the input folder": "{tmp}/good --force: the input is inside it; nothing was deleted",
    "output inside the input folder": "{tmp}/pics/shards: inside the input folder {tmp}/pics; write the output",
    "one class": "INPUT {tmp}/oneclass: 1 class (cat); a classifier needs at least 2",
    "force over a preparation that holds a run": "{tmp}/prepared --force: holds run, which data_prep did not write",
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, fashion_small):
    x, y, _, _ = fashion_small
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, dict(_bad_inputs(tmp, None, x[:100], y[:100]))


def test_every_bad_input_has_a_message_check(bad_inputs):
    assert set(bad_inputs[1]) == set(BAD_INPUT_MESSAGES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_INPUT_MESSAGES))
def test_bad_input_one_line_exit_2_nothing_written(bad_inputs, name):
    tmp, cases = bad_inputs
    before = sorted(os.listdir(tmp))
    proc = prep(*cases[name])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {proc.stderr!r}"
    assert BAD_INPUT_MESSAGES[name].format(tmp=tmp) in lines[0], lines[0]
    assert sorted(os.listdir(tmp)) == before, f"{name}: something was written"
    assert (tmp / "exists" / "keep.txt").read_text() == "user data"
    assert (tmp / "prepared" / "run" / "keep.txt").read_text() == "user data"
    assert sorted(os.listdir(tmp / "pics")) == ["c0", "c1"]


@pytest.mark.slow
def test_sixteen_bit_pngs_keep_their_grey_levels(tmp_path, fashion_small):
    """A 16-bit PNG is scaled to 8 bits (v * 255 / 65535, rounded), not clipped to 0/255."""
    from PIL import Image

    x, _, _, _ = fashion_small
    src = tmp_path / "scans"
    expected = {}
    for k in range(2):
        (src / f"c{k}").mkdir(parents=True)
        for j in range(20):
            v = x[k * 20 + j].astype(np.uint16) * 257 + (j % 7)  # the full 16-bit range, off the 257 grid
            Image.fromarray(v).save(src / f"c{k}" / f"{j:02d}.png")
            expected[f"c{k}/{j:02d}.png"] = np.rint(v * (255 / 65535)).astype(np.uint8)
    require_ok(prep("imagefolder", src, tmp_path / "out", "--grid", "2x2", "--channels", "1"))
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*.png"))
    with h5py.File(tmp_path / "out" / "full.h5", "r") as f:
        for split in ("train", "val", "test"):
            for sid, pixels in zip(f[split]["sample_id"][:], f[split]["x"][:]):
                np.testing.assert_array_equal(pixels[0], expected[files[sid]])


def test_sigterm_leaves_no_partial_output(tmp_path, fashion_dir):
    """SIGTERM (scancel) in the middle of a conversion: exit 143, one line, no output, no hidden folder."""
    import signal
    import subprocess
    import sys
    import time


    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "idx", fashion_dir, str(out), "--grid", "4x4",
                             "--overlap", "2", "--margin", "2"], stderr=subprocess.PIPE, text=True,
                            env=env_for_tests())
    t0 = time.time()
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()) and time.time() - t0 < 120:
        time.sleep(0.02)  # the conversion has begun writing
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["data_prep: stopped by SIGTERM; nothing was written"]
    assert os.listdir(tmp_path) == []


@pytest.fixture()
def small_disk(tmp_path):
    """A 3 MB tmpfs."""
    yield from mounted_tmpfs(tmp_path, "3m")


def test_full_disk_is_refused_before_writing(small_disk, fashion_small, tmp_path):
    x, y, _, _ = fashion_small
    np.savez(tmp_path / "big.npz", x=np.repeat(x, 4, axis=0), y=np.repeat(y, 4))
    proc = prep("npz", tmp_path / "big.npz", small_disk / "out", "--grid", "4x4", "--overlap", "2")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert f"{small_disk}/out: the shards need about" in lines[0] and "free" in lines[0], lines[0]
    assert os.listdir(small_disk) == []


def test_a_disk_that_fills_while_writing_is_one_line(tmp_path, fashion_dir):
    """The up-front space check passes, then another process fills the file system while the shards are
    written: exit 2, one line naming the file system and the file, nothing left (no hidden folder); HDF5's
    unflushable buffers must not crash the process at exit (it did: exit 139)."""
    import subprocess
    import sys
    import time


    disk = next(fs := mounted_tmpfs(tmp_path, "48m"))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "data_prep", "idx", fashion_dir, str(disk / "out"), "--grid",
                                 "2x2", "--max-train", "5000", "--quiet"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env_for_tests())
        t0 = time.time()
        while time.time() - t0 < 60 and proc.poll() is None and not any(
                (p / "sub_000.h5").exists() for p in disk.iterdir() if p.name.startswith(".out.tmp-")):
            time.sleep(0.002)
        with open(disk / "filler", "wb") as f:  # another user's job fills the disk
            try:
                f.write(b"\0" * (40 << 20))
            except OSError:
                pass
        _, err = proc.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"error: {disk}/out: the file system at {disk} filled up while writing "), lines
        assert ".h5" in lines[0] and "nothing was written" in lines[0], lines
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    finally:
        next(fs, None)


def test_image_folder_conventions_match_torchvision(tmp_path):
    """Extensions and class discovery are torchvision's ImageFolder's (kept in data_prep, not imported)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    from data_prep.sources import IMAGE_SUFFIXES, _class_folders

    assert set(IMG_EXTENSIONS) <= set(IMAGE_SUFFIXES)
    for name in ("b", "a", "A", "c_1", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "file.png").write_bytes(b"")
    assert _class_folders(str(tmp_path)) == [c for c in find_classes(str(tmp_path))[0] if not c.startswith(".")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_dropped_by_python_still_stops_before_anything_is_written(tmp_path, fashion_dir, signum):
    """Python runs a signal handler between any bytecodes, also inside a weakref callback or __del__,
    where the exception it raises is printed and dropped (CI saw a SIGTERMed conversion finish and exit
    0 that way, and a Ctrl-C print a traceback and finish). The handler's flag stops the conversion at
    the next chunk with the signal's own exception: no output, no hidden folder."""
    from data_prep import writer
    from data_prep.cli import run

    class Dropped:
        def __del__(self):
            writer.terminate(signum, None)

    out = tmp_path / "out"
    try:
        Dropped()  # the handler's exception is dropped here, as in the weakref callback
        with pytest.raises(writer.STOPS[signum]):
            run(["idx", fashion_dir, str(out), "--grid", "2x2", "--max-train", "500", "--max-test", "100", "--quiet"])
    finally:
        writer._SIGNALLED.clear()
    assert os.listdir(tmp_path) == []


def test_a_stop_after_the_output_is_complete_keeps_it_and_says_so(tmp_path, fashion_dir, capsys):
    """A signal that lands after the output was moved into place (while the ranks hear the manifest, or
    the summary prints) must not say "nothing was written" over a complete, kept output."""
    from data_prep.cli import run, stopped

    out = tmp_path / "out"
    run(["idx", fashion_dir, str(out), "--grid", "2x2", "--max-train", "500", "--max-test", "100", "--quiet"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # stopped() ignores further signals while the process leaves
        assert stopped(None, 130, "interrupted", str(out)) == 130
        assert capsys.readouterr().err == f"data_prep: interrupted after {out} was complete; it is kept\n"
        assert (out / "manifest.json").exists()
        assert stopped(None, 143, "stopped by SIGTERM", str(tmp_path / "other")) == 143
        assert capsys.readouterr().err == "data_prep: stopped by SIGTERM; nothing was written\n"
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
