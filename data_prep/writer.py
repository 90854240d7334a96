"""Write a ``Source`` as HDF5 shards: one file per subdomain plus ``full.h5`` (format: docs/shard-format.md).

The output directory appears whole or not at all: everything is written into a temporary sibling
directory that is renamed into place at the end.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import h5py
import numpy as np

from hpcdd import __version__
from hpcdd.checkpoint import current_umask
from hpcdd.data import ids_digest
from hpcdd.manifest import FORMAT_VERSION, FULL_NAME, MANIFEST_NAME, shard_name
from hpcdd.decomposition import Decomposition
from hpcdd.errors import UserError

from .sources import Source, Split, file_checksum, stratified_split

BLOCK = 8192


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            print(f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% {time.perf_counter() - self.start:6.1f}s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def is_prep_output(path: str) -> bool:
    """A directory data_prep wrote: its manifest.json says so."""
    try:
        with open(os.path.join(path, MANIFEST_NAME)) as f:
            m = json.load(f)
        return "format_version" in m and str(m.get("tool", "")).startswith("hpcdd")
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: str, force: bool, inputs=()) -> None:
    """Refuse an existing output directory unless ``--force``, and even then anything that is not a
    data_prep output (or empty) or that holds the input; the parent must be writable."""
    if os.path.exists(out) and not force:
        raise UserError(f"{out}: already exists; choose a new output directory or pass --force to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out}: exists and is not a directory")
    if os.path.exists(out):
        real = os.path.realpath(out)
        if any(os.path.realpath(p) == real or os.path.realpath(p).startswith(real.rstrip(os.sep) + os.sep)
               for p in inputs):
            raise UserError(f"{out} --force: the input is inside it; nothing was deleted, choose another output")
        if os.listdir(out) and not is_prep_output(out):
            raise UserError(f"{out} --force: not a data_prep output (no manifest.json written by hpcdd-prep); "
                            f"--force replaces only those, nothing was deleted")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"{out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{out}: parent directory {parent} is not writable")


def _chunk_samples(sample_bytes: int, n: int) -> int:
    return int(max(1, min(n, 256, (64 << 10) // max(sample_bytes, 1))))


def _pad(x: np.ndarray, margin: int) -> np.ndarray:
    if margin == 0:
        return x
    pad = [(0, 0), (0, 0)] + [(margin, margin)] * (x.ndim - 2)
    return np.pad(x, pad)


def channel_stats(x: np.ndarray, scale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the (scaled) training images, accumulated in float64."""
    c = x.shape[1]
    s, s2, count = np.zeros(c), np.zeros(c), 0
    axes = (0,) + tuple(range(2, x.ndim))
    for a in range(0, len(x), BLOCK):
        block = x[a:a + BLOCK].astype(np.float64) * scale
        s += block.sum(axis=axes)
        s2 += (block * block).sum(axis=axes)
        count += block.size // c
    mean = s / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
    std[std == 0] = 1.0
    return mean.tolist(), std.tolist()


def _write_file(path: str, attrs: dict, splits: dict[str, Split], cut, margin: int, progress) -> list:
    """One shard: per split a group with x (chunked), y, sample_id. Returns the subimage shape."""
    shape = None
    with h5py.File(path, "w", libver="latest") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, split in splits.items():
            g = f.create_group(name)
            n = len(split.y)
            first = cut(_pad(split.x[:1], margin))
            shape = first.shape[1:]
            chunk = _chunk_samples(first[0].nbytes, n)
            ds = g.create_dataset("x", shape=(n,) + shape, dtype=first.dtype, chunks=(chunk,) + shape)
            for a in range(0, n, BLOCK):
                ds[a:a + BLOCK] = cut(_pad(split.x[a:a + BLOCK], margin))
                progress.update(min(BLOCK, n - a))
            g.create_dataset("y", data=split.y.astype(np.int64))
            g.create_dataset("sample_id", data=split.ids.astype(np.int64))
            g.attrs["count"] = n
    return list(shape)


def make_splits(source: Source, val_fraction: float, seed: int) -> dict[str, Split]:
    """train / val (stratified, seeded, carved from the source's training split) / test."""
    kept, held = stratified_split(source.train.y, val_fraction, seed, "--val-fraction")
    tr = source.train
    splits = {"train": Split(tr.x[kept], tr.y[kept], tr.ids[kept]),
              "val": Split(tr.x[held], tr.y[held], tr.ids[held])}
    if source.test is not None:
        splits["test"] = source.test
    for name, split in splits.items():
        if len(split.y) == 0:
            raise UserError(f"the {name} split is empty; use more data or another --val-fraction")
    return splits


def write_dataset(source: Source, out: str, grid, overlap: int, margin: int, val_fraction: float,
                  seed: int, force: bool = False, full: bool = True, progress: bool | None = None) -> dict:
    """Write manifest.json, sub_XXX.h5 for every subdomain and full.h5; return the manifest."""
    check_output(out, force, source.files)
    x0 = source.train.x
    deco = Decomposition(x0.shape[2:], grid, overlap)
    if margin < 0:
        raise UserError(f"--margin {margin}: expected a non-negative number of pixels")
    splits = make_splits(source, val_fraction, seed)
    scale = 1.0 / 255.0 if x0.dtype == np.uint8 else 1.0
    mean, std = channel_stats(splits["train"].x, scale)
    checksum = file_checksum(source.files)
    options = dict(grid=list(deco.grid), overlap=overlap, margin=margin, val_fraction=val_fraction,
                   seed=seed, shape=list(x0.shape[1:]), n={k: len(v.y) for k, v in splits.items()})
    prep_id = hashlib.sha256((checksum + json.dumps(options, sort_keys=True) + __version__).encode()).hexdigest()[:16]
    digests = {name: ids_digest(split.ids) for name, split in splits.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": f"hpcdd {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": source.name,
        "classes": list(source.classes),
        "num_classes": len(source.classes),
        "splits": {name: len(split.y) for name, split in splits.items()},
        "image_shape": list(x0.shape[1:]),
        "dims": deco.dims,
        "grid": list(deco.grid),
        "overlap": overlap,
        "margin": margin,
        "boxes": [[list(b) for b in box] for box in deco.boxes()],
        "dtype": str(x0.dtype),
        "scale": scale,
        "mean": mean,
        "std": std,
        "source": {"kind": source.kind, "description": source.description,
                   "files": [os.path.abspath(p) for p in source.files], "sha256": checksum},
        "seed": seed,
        "val_fraction": val_fraction,
        "prep_id": prep_id,
        "sample_ids_sha256": digests,
        "shards": [shard_name(i) for i in range(deco.n)],
        "full": FULL_NAME if full else None,
    }
    check_space(out, output_bytes(deco, splits, margin, x0, full))
    total = sum(len(s.y) for s in splits.values()) * (deco.n + (1 if full else 0))
    bar = Progress(total, f"writing {deco.n} shards", progress)
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would survive the rename
        common = {"format_version": FORMAT_VERSION, "grid": list(deco.grid), "overlap": overlap,
                  "margin": margin, "prep_id": prep_id, "image_shape": list(x0.shape[1:]),
                  "num_classes": len(source.classes)}
        shapes = []
        for i in range(deco.n):
            attrs = dict(common, index=i, box=np.asarray(deco.box(i), dtype=np.int64))
            shapes.append(_write_file(os.path.join(tmp, shard_name(i)), attrs, splits,
                                      lambda b, i=i: deco.cut(b, i, margin), margin, bar))
        if full:
            attrs = dict(common, index=-1, box=np.asarray([(0, s) for s in deco.image_shape], dtype=np.int64))
            _write_file(os.path.join(tmp, FULL_NAME), attrs, splits, lambda b: b, margin, bar)
        manifest["subimage_shapes"] = shapes
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        bar.close()
        if os.path.exists(out):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.old-", dir=parent)
            os.rename(out, os.path.join(trash, "old"))
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{out}: no space left on its file system while writing ({e.strerror}); nothing was "
                            f"written, free space and run again") from None
        raise
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def output_bytes(deco, splits: dict, margin: int, x0: np.ndarray, full: bool) -> int:
    """What the shards take on disk (uncompressed pixels, labels and ids, plus HDF5 overhead)."""
    per_sample = sum(float(np.prod([b - a + 2 * margin for a, b in deco.box(i)])) for i in range(deco.n))
    if full:
        per_sample += float(np.prod([s + 2 * margin for s in deco.image_shape]))
    n = sum(len(s.y) for s in splits.values())
    return int(n * (per_sample * x0.shape[1] * x0.dtype.itemsize + 16 * (deco.n + full)) + (1 << 20) * (deco.n + 1))


def check_space(out: str, need: int) -> None:
    """Refuse before writing when the shards cannot fit (HDF5 may crash outright on a full disk)."""
    parent = os.path.dirname(os.path.abspath(out))
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UserError(f"{out}: the shards need about {need / 1e9:.2f} GB but its file system has {free / 1e9:.2f} GB "
                        f"free; free space, write elsewhere, or choose a coarser grid/smaller --size")
