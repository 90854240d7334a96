"""data_prep at scale: streamed in chunks, several workers, several MPI ranks, corrupt files half-way.

The output must not depend on how it was made: every variant is compared byte for byte (shards)
with a one-worker, one-rank conversion of the same input.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from data_prep.ranks import launched_tasks
from tests.helpers import (cifar_pickles, env_for_tests, fashion_images, mpiexec_path, require_ok, run_python,
                           shard_digest)

pytestmark = [pytest.mark.mpi]


def prep(*args, ranks=None, timeout=300):
    return run_python(["-m", "data_prep", *map(str, args), "--quiet"], ranks=ranks, timeout=timeout)


def manifest_of(out) -> dict:
    m = json.load(open(os.path.join(out, "manifest.json")))
    m.pop("created")
    m.pop("manifest_sha256")  # its seal covers the creation time
    return m


# two 28x28x3 images per chunk: the writing of a job the tests interrupt lasts about 10 s, well past the
# second or two that mpirun takes to pass a signal on (with 8 images per chunk a loaded CI machine
# finished the whole preparation before Open MPI's ranks got the SIGTERM)
SLOW_CHUNK_MB = "0.005"


@pytest.fixture(scope="module")
def real_images(fashion_dir):
    """1,200 real Fashion-MNIST training images, 300 test images, with labels."""
    return fashion_images(fashion_dir, 1200, 300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, real_images):
    """An ImageFolder (train/ and test/) of PNGs, file names unrelated to the original order."""
    from PIL import Image

    x, y, xt, yt = real_images
    root = tmp_path_factory.mktemp("folder") / "fm"
    for split, xs, ys in (("train", x, y), ("test", xt, yt)):
        for j, (img, k) in enumerate(zip(xs, ys)):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([img] * 3, -1)).save(d / f"{(j * 7919) % 100003:06d}.png")
    return root


def test_launched_tasks_from_the_environment():
    assert launched_tasks({}) == 1
    assert launched_tasks({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == 1  # an sbatch script, no srun
    assert launched_tasks({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}) == 4
    assert launched_tasks({"PMI_SIZE": "2", "PMI_RANK": "1"}) == 2
    assert launched_tasks({"OMPI_COMM_WORLD_SIZE": "3"}) == 3


def test_output_does_not_depend_on_chunks_workers_or_ranks(tmp_path, folder):
    """Image folder, 4x4 grid with overlap and margin: one worker and one chunk of everything, tiny
    chunks, two workers, two MPI ranks (each with its own worker): the same shard bytes."""
    common = ["--grid", "4x4", "--overlap", "2", "--margin", "1", "--channels", "1"]
    require_ok(prep("imagefolder", folder, tmp_path / "one", *common, "--workers", "1", "--chunk-mb", "1000"))
    reference = shard_digest(tmp_path / "one")
    assert len(reference) == 17
    variants = {"tiny chunks": ["--workers", "1", "--chunk-mb", "0.05"], "two workers": ["--workers", "2"]}
    for name, extra in variants.items():
        require_ok(prep("imagefolder", folder, tmp_path / name.replace(" ", "_"), *common, *extra))
        assert shard_digest(tmp_path / name.replace(" ", "_")) == reference, name
        assert manifest_of(tmp_path / name.replace(" ", "_"))["mean"] == manifest_of(tmp_path / "one")["mean"]
    require_ok(prep("imagefolder", folder, tmp_path / "ranks", *common, "--workers", "1", "--chunk-mb", "0.2",
                    ranks=2))
    assert shard_digest(tmp_path / "ranks") == reference
    m = manifest_of(tmp_path / "ranks")
    assert m == manifest_of(tmp_path / "one")
    assert m["split_draw"].startswith("content")
    assert sorted(os.listdir(tmp_path)) == ["one", "ranks", "tiny_chunks", "two_workers"]


def test_split_is_a_function_of_the_images(tmp_path, real_images):
    """The same images as CIFAR-style pickles (in their original order) and as an image folder (sorted
    by class, then by unrelated file names): the same images are held out for validation."""
    from PIL import Image

    x, y, xt, yt = real_images
    rgb = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1)
    rgbt = np.repeat(np.pad(xt, ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1)
    src = tmp_path / "cifar-10-batches-py"
    cifar_pickles(src, rgb, y, rgbt, yt, [f"class_{k}" for k in range(10)])
    folder = tmp_path / "folder"
    for split, xs, ys in (("train", rgb, y), ("test", rgbt, yt)):
        for j, (img, k) in enumerate(zip(xs, ys)):
            (folder / split / f"class_{k}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(folder / split / f"class_{k}" / f"{(j * 7919) % 100003:06d}.png")
    require_ok(prep("cifar10", src, tmp_path / "pickles", "--grid", "2x2", "--max-test", "200"))
    require_ok(prep("imagefolder", folder, tmp_path / "pngs", "--grid", "2x2", "--max-test", "200"))

    def images(out, split):
        with h5py.File(os.path.join(out, "full.h5"), "r") as f:
            return sorted(hashlib.sha256(a.tobytes()).hexdigest() for a in f[split]["x"][:])
    for split in ("val", "test", "train"):
        assert images(tmp_path / "pickles", split) == images(tmp_path / "pngs", split), split
    # by position instead, the two formats hold out different images (why content is the default)
    require_ok(prep("cifar10", src, tmp_path / "p2", "--grid", "2x2", "--split-draw", "position"))
    require_ok(prep("imagefolder", folder, tmp_path / "f2", "--grid", "2x2", "--split-draw", "position"))
    assert images(tmp_path / "p2", "val") != images(tmp_path / "f2", "val")


@pytest.fixture()
def corrupt_folder(tmp_path, real_images):
    """400 JPEG/PNG files, one corrupt JPEG in the middle of the class folders."""
    from PIL import Image

    x, y, _, _ = real_images
    root = tmp_path / "src"
    for j in range(400):
        d = root / f"k{y[j]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[j]).save(d / f"{j:04d}.{'png' if j % 2 else 'jpg'}")
    files = sorted(p for p in root.rglob("*.*"))
    bad = files[len(files) // 2]
    bad.write_bytes(bad.read_bytes()[:300] + b"\x00" * 50)
    bad.rename(bad.with_suffix(".jpg"))
    return root, bad.with_suffix(".jpg")


@pytest.mark.parametrize("draw", ["content", "position"])
def test_corrupt_file_half_way_is_named_and_nothing_is_left(tmp_path, corrupt_folder, draw):
    """Found by the hashing pass (content) or while writing the shards (position): one line naming
    the file, exit 2, no output folder, no hidden temporary folder."""
    root, bad = corrupt_folder
    before = sorted(os.listdir(tmp_path))
    proc = prep("imagefolder", root, tmp_path / "out", "--grid", "2x2", "--channels", "1", "--split-draw", draw,
                "--chunk-mb", "0.01")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {bad}: cannot decode image"), lines[0]
    assert sorted(os.listdir(tmp_path)) == before


def test_skip_bad_skips_and_lists_the_file(tmp_path, corrupt_folder):
    root, bad = corrupt_folder
    proc = prep("imagefolder", root, tmp_path / "out", "--grid", "2x2", "--channels", "1", "--skip-bad")
    require_ok(proc)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert len(m["skipped"]) == 1 and m["skipped"][0].startswith(f"{bad}: cannot decode image")
    assert sum(m["splits"].values()) == 399


def test_bad_file_under_two_ranks_is_one_line(tmp_path, corrupt_folder):
    root, bad = corrupt_folder
    proc = prep("imagefolder", root, tmp_path / "out", "--grid", "2x2", "--channels", "1", "--workers", "1",
                ranks=2)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == [f"error: {lines[0][7:]}"] and str(bad) in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def _rank_pid(rank: int, marker: str) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"data_prep" in cmd and marker.encode() in b" ".join(cmd) and (
                f"PMI_RANK={rank}".encode() in env or f"OMPI_COMM_WORLD_RANK={rank}".encode() in env):
            return int(pid)
    return None


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_rank_that_dies_or_hangs_ends_the_job(tmp_path, folder, how):
    """Rank 1 SIGKILLed (or SIGSTOPped: --timeout) while the shards are written: the job ends, no
    output folder appears and nothing left looks like a finished output (no manifest)."""
    out = tmp_path / "out"
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "data_prep", "imagefolder", str(folder), str(out),
           "--grid", "4x4", "--overlap", "2", "--workers", "1", "--chunk-mb", SLOW_CHUNK_MB, "--timeout", "5", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for_tests())
    t0 = time.time()
    pid = None
    while time.time() - t0 < 120 and proc.poll() is None:
        pid = pid or _rank_pid(1, str(out))
        if pid and any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
            break
        time.sleep(0.01)
    assert pid and proc.poll() is None, "the conversion ended before rank 1 could be stopped"
    os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if how == "stopped":
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    if how == "stopped":
        assert "rank 1 (host " in err and "sent nothing for 5 s" in err, err[-2000:]
    assert time.time() - t0 < 90
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert all(p.name.startswith(".out.tmp-") and not (p / "manifest.json").exists() for p in leftovers), leftovers


def test_fashion_mnist_shards_do_not_depend_on_the_chunk_size(tmp_path, fashion_dir):
    """All 70,000 Fashion-MNIST images, 4x4 grid, overlap 2, margin 1, position draws: written in the
    default chunks (8,192 images, the blocks data_prep wrote before it streamed) and in chunks of 0.5 MB
    (668 images), the shards are byte-identical and the manifests equal."""
    common = ["--grid", "4x4", "--overlap", "2", "--margin", "1", "--split-draw", "position"]
    require_ok(prep("idx", fashion_dir, tmp_path / "default", *common))
    require_ok(prep("idx", fashion_dir, tmp_path / "small", *common, "--chunk-mb", "0.5"))
    assert shard_digest(tmp_path / "small") == shard_digest(tmp_path / "default")
    assert manifest_of(tmp_path / "small") == manifest_of(tmp_path / "default")
    assert manifest_of(tmp_path / "default")["splits"] == {"train": 54000, "val": 6000, "test": 10000}


@pytest.mark.parametrize("launcher,sig,group,workers", [("mpich", signal.SIGINT, True, 2),
                                                        ("mpich", signal.SIGTERM, False, 1),
                                                        ("openmpi", signal.SIGINT, True, 2),
                                                        ("openmpi", signal.SIGTERM, False, 1)])
def test_a_signal_to_the_launcher_ends_every_rank(tmp_path, folder, launcher, sig, group, workers):
    """Ctrl-C at a terminal (SIGINT to the launcher and every rank: its process group) or a signal to the
    launcher alone, while ``mpiexec -n 2 hpcdd-prep`` writes the shards: every rank leaves within seconds,
    and neither the output nor a hidden temporary folder is left."""
    out = tmp_path / "out"
    env = env_for_tests()
    launch = [mpiexec_path()]
    if launcher == "openmpi":
        if not os.path.exists("/usr/bin/mpirun.openmpi"):
            pytest.skip("Open MPI not installed (apt-get install openmpi-bin; .ci/run does)")
        launch = ["/usr/bin/mpirun.openmpi"]
        env.update({"MPI4PY_MPIABI": "openmpi", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                    "OMPI_MCA_rmaps_base_oversubscribe": "1"})
    cmd = [*launch, "-n", "2", sys.executable, "-m", "data_prep", "imagefolder", str(folder), str(out), "--grid", "4x4",
           "--overlap", "2", "--workers", str(workers), "--chunk-mb", SLOW_CHUNK_MB, "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None:
        if any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    pids = [pid for pid in (_rank_pid(r, str(out)) for r in (0, 1)) if pid]
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    sent = time.time()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{launcher} still running 30 s after {sig.name}")
    assert time.time() - sent < 10, time.time() - sent
    deadline = time.time() + 5
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids), "a rank outlived its launcher"
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-2000:]
    assert not out.exists()
    left = list(tmp_path.iterdir())
    if launcher == "openmpi" and left:
        # mpirun follows Ctrl-C with SIGKILL about a second later: on a loaded machine rank 0 may not finish
        # removing its hidden folder; then its writer's lock is gone and the next prep of OUT removes it
        from data_prep.writer import leftovers

        assert sorted(map(str, left)) == leftovers(str(out)) and not any((p / "manifest.json").exists() for p in left)
    else:
        assert left == [], left


def test_a_killed_preparation_leaves_nothing_for_long(tmp_path, folder):
    """A writer SIGKILLed half-way leaves its hidden .OUT.tmp-* folder (nothing can run in a killed process):
    the next preparation of the same OUT removes it and says so, but never one a live writer holds."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", "imagefolder", str(folder), str(out), "--grid", "4x4", "--workers", "1",
           "--chunk-mb", SLOW_CHUNK_MB, "--quiet"]
    live = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_for_tests())
    t0 = time.time()
    while time.time() - t0 < 120 and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]:
        time.sleep(0.01)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and live.poll() is None
    from data_prep.writer import leftovers

    assert leftovers(str(out)) == []  # a live writer holds it
    live.kill()
    live.communicate()
    assert leftovers(str(out)) == [str(left[0])]
    proc = run_python(["-m", "data_prep", "imagefolder", str(folder), str(out), "--grid", "2x2"], timeout=300)
    require_ok(proc)
    assert f"data_prep: removed {left[0]}, left by an interrupted preparation of {out}" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (out / ".owner").exists()


def test_workers_are_capped_by_cores_and_free_memory(tmp_path, folder, monkeypatch):
    """--workers 64 on this machine: capped at the cores this process may use, with one line; where memory
    is short, reduced to what fits, or refused in one line when not even one decoding process fits."""
    import argparse

    from data_prep import cli
    from hpcdd.errors import UserError

    proc = prep("imagefolder", folder, tmp_path / "out", "--grid", "2x2", "--workers", "64")
    require_ok(proc)
    cores = len(os.sched_getaffinity(0))
    assert f"data_prep: --workers 64 capped at {cores}, the cores this process may use" in proc.stderr
    args = argparse.Namespace(workers=64, oversubscribe=True, decoder="torchvision", chunk_mb=128.0)
    monkeypatch.setattr(cli, "available_mb", lambda: 4000.0)
    assert cli.safe_workers(args, None, "torchvision") == int(0.8 * 4000 // (cli.WORKER_MB["torchvision"] + 128))
    monkeypatch.setattr(cli, "available_mb", lambda: 500.0)
    with pytest.raises(UserError, match="one torchvision decoding process needs about 828 MB but only 500 MB"):
        cli.safe_workers(args, None, "torchvision")
    assert cli.safe_workers(argparse.Namespace(workers=4, oversubscribe=True, decoder="pil", chunk_mb=128.0), None, "pil") == 2


def test_sigterm_while_workers_start_stops_within_seconds(tmp_path, folder):
    """SIGTERM (scancel) while the decoding processes are starting: the preparation and every worker end
    within 5 s, and nothing is left."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "imagefolder", str(folder), str(out), "--grid", "2x2",
                             "--workers", "4", "--oversubscribe", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for_tests())

    def children():
        found = []
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1] == str(proc.pid):
                    found.append(int(pid))
            except OSError:
                pass
        return found

    t0 = time.time()
    while time.time() - t0 < 60 and proc.poll() is None and not children():
        time.sleep(0.005)
    workers = children()
    assert workers and proc.poll() is None, "no decoding process started"
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 5 and proc.returncode == 143, (time.time() - sent, proc.returncode, err[-2000:])
    assert [ln for ln in err.splitlines() if ln.strip()] == ["data_prep: stopped by SIGTERM; nothing was written"], err
    time.sleep(0.5)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read()]
    assert os.listdir(tmp_path) == []
