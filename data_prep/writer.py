"""Write a ``Source`` as HDF5 shards: one file per subdomain plus ``full.h5`` (format: docs/shard-format.md).

The output directory appears whole or not at all: everything is written into a temporary sibling
directory that is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import gc
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time

import h5py
import numpy as np

from hpcdd import __version__
from hpcdd.atomic import current_umask
from hpcdd.data import ids_digest
from hpcdd.manifest import FORMAT_VERSION, FULL_NAME, MANIFEST_NAME, seal, shard_name
from hpcdd.decomposition import Decomposition
from hpcdd.errors import UserError

from .ranks import Ranks
from .sources import Images, Source, Split, file_checksum, stratified_split


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


def foreign_files(out: str) -> list[str]:
    """What a data_prep output holds besides the files its manifest lists (a user's run, notes...)."""
    try:
        with open(os.path.join(out, MANIFEST_NAME)) as f:
            m = json.load(f)
        ours = {MANIFEST_NAME, *m.get("shards", []), *([m["full"]] if m.get("full") else [])}
    except (OSError, ValueError, TypeError, AttributeError):
        ours = {MANIFEST_NAME}
    return sorted(n for n in os.listdir(out) if n not in ours)


def check_output(out: str, force: bool, inputs=()) -> None:
    """Refuse an existing output directory unless ``--force``, and even then anything that is not a
    data_prep output (or empty) or that holds the input; the parent must be writable."""
    if os.path.exists(out) and not force:
        raise UserError(f"{out}: already exists; choose a new output directory or pass --force to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out}: exists and is not a directory")
    real = os.path.realpath(out)
    for p in inputs:
        source = os.path.realpath(p)
        if os.path.isdir(source) and real.startswith(source.rstrip(os.sep) + os.sep):
            raise UserError(f"{out}: inside the input folder {p}; write the output elsewhere (a later preparation "
                            f"of {p} would take it for a class)")
    if os.path.exists(out):
        if any(os.path.realpath(p) == real or os.path.realpath(p).startswith(real.rstrip(os.sep) + os.sep)
               for p in inputs):
            raise UserError(f"{out} --force: the input is inside it; nothing was deleted, choose another output")
        if os.listdir(out) and not is_prep_output(out):
            raise UserError(f"{out} --force: not a data_prep output (no manifest.json written by hpcdd-prep); "
                            f"--force replaces only those, nothing was deleted")
        foreign = foreign_files(out) if os.listdir(out) else []
        if foreign:
            listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"{out} --force: holds {listed}, which data_prep did not write; nothing was deleted "
                            f"(move them out, or choose another output)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"{out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{out}: parent directory {parent} is not writable")


CHUNK_BYTES = 128 << 20  # pixels decoded and written at a time (one chunk; 8192 Fashion-MNIST images)
STATS_BLOCK = 8192


def _chunk_samples(sample_bytes: int, n: int) -> int:
    """Samples per HDF5 chunk of a shard (the unit a streamed training reads)."""
    return int(max(1, min(n, 256, (64 << 10) // max(sample_bytes, 1))))


def chunk_rows(item_shape, itemsize: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Samples converted at a time: at most ``STATS_BLOCK``, at most ``chunk_bytes`` of pixels."""
    sample = int(np.prod(item_shape)) * itemsize
    return int(max(1, min(STATS_BLOCK, chunk_bytes // max(sample, 1))))


def chunks(n: int, rows: int):
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


def release_freed_memory() -> None:
    """Hand the freed pages of a chunk's temporaries back to the system: glibc keeps freed heap memory
    resident (its mmap threshold grows with the chunk's large arrays), about 100 MB at 112x112."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _pad(x: np.ndarray, margin: int) -> np.ndarray:
    if margin == 0:
        return x
    pad = [(0, 0), (0, 0)] + [(margin, margin)] * (x.ndim - 2)
    return np.pad(x, pad)


class ChannelStats:
    """Per-channel mean and std of the (scaled) training images, summed exactly, so the result does
    not depend on how the split was cut into chunks (or ranks): integer sums for 8-bit pixels,
    per-image float64 sums added without rounding (Shewchuk's partials, as ``math.fsum``) for floats."""

    def __init__(self, channels: int, scale: float):
        self.scale, self.count = scale, 0
        self.ints = [0, 0]  # 8-bit: sums of v and v*v per channel (Python ints: no overflow)
        self.partials = [[[] for _ in range(channels)] for _ in range(2)]

    def add(self, x: np.ndarray) -> None:
        c = x.shape[1]
        flat = x.reshape(len(x), c, -1)
        self.count += flat.shape[0] * flat.shape[2]
        step = max(1, (1 << 20) // max(1, flat.shape[1] * flat.shape[2]))  # bincount widens to int64: 8 MB at a time
        for a in range(0, len(flat), step):
            part = flat[a:a + step]
            if x.dtype == np.uint8:  # value histograms: exact and without a widened copy
                levels = np.arange(256, dtype=np.int64)
                counts = np.stack([np.bincount(part[:, ch].ravel(), minlength=256) for ch in range(c)])
                self.ints[0] = self.ints[0] + counts @ levels
                self.ints[1] = self.ints[1] + counts @ (levels * levels)
                continue
            wide = part.astype(np.float64)
            for k, values in enumerate((wide.sum(axis=2), (wide * wide).sum(axis=2))):
                for ch in range(c):
                    for v in values[:, ch].tolist():
                        _exact_add(self.partials[k][ch], v)

    def result(self) -> tuple[list[float], list[float]]:
        n = max(self.count, 1)
        if isinstance(self.ints[0], np.ndarray):
            s = np.array([int(v) for v in self.ints[0]], dtype=np.float64) / n * self.scale
            s2 = np.array([int(v) for v in self.ints[1]], dtype=np.float64) / n * self.scale * self.scale
        else:
            s = np.array([math.fsum(p) for p in self.partials[0]]) / n * self.scale
            s2 = np.array([math.fsum(p) for p in self.partials[1]]) / n * self.scale * self.scale
        std = np.sqrt(np.maximum(s2 - s * s, 0.0))
        std[std == 0] = 1.0
        return s.tolist(), std.tolist()


def _exact_add(partials: list, x: float) -> None:
    """Add ``x`` to a list of non-overlapping partial sums without rounding (Shewchuk)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


class ShardFiles:
    """The open shard files of one preparation, written split by split, chunk by chunk.

    Within each file the order of HDF5 operations is the one of writing it alone (attributes; per
    split: x, its chunks in order, y, sample_id), so the bytes do not depend on the chunk size.
    """

    def __init__(self, folder: str, names: list[str], attrs: list[dict], cuts: list, margin: int, progress):
        self.names, self.split, self.writing = names, "", "the shard files"
        self.files = [h5py.File(os.path.join(folder, name), "w", libver="latest") for name in names]
        self.cuts, self.margin, self.progress, self.shapes = cuts, margin, progress, [None] * len(names)
        self.x, self.groups = [], []
        for f, a in zip(self.files, attrs):
            for key, value in a.items():
                f.attrs[key] = value

    def begin(self, name: str, n: int, item_shape, dtype) -> None:
        self.split, self.writing = name, f"the shard files ({name} split)"
        probe = _pad(np.zeros((1,) + tuple(item_shape), dtype), self.margin)
        # The previous split's datasets stay open until this split's exist: HDF5 places the chunks
        # left in a dataset's cache when it is closed, so the bytes depend on when that happens.
        xs, groups = [], []
        for j, (f, cut) in enumerate(zip(self.files, self.cuts)):
            shape = cut(probe).shape[1:]
            self.shapes[j] = list(shape)
            chunk = _chunk_samples(int(np.prod(shape)) * np.dtype(dtype).itemsize, n)
            groups.append(f.create_group(name))
            xs.append(groups[-1].create_dataset("x", shape=(n,) + shape, dtype=dtype, chunks=(chunk,) + shape,
                                                fletcher32=True))  # HDF5 verifies every chunk it reads
        self.x, self.groups = xs, groups

    def write(self, a: int, block: np.ndarray) -> None:
        padded = _pad(block, self.margin)
        for name, ds, cut in zip(self.names, self.x, self.cuts):
            self.writing = f"{name} ({self.split} split, images {a}..{a + len(block) - 1})"
            ds[a:a + len(block)] = cut(padded)
            self.progress.update(len(block))

    def end(self, name: str, split: Split) -> None:
        for g in self.groups:
            g.create_dataset("y", data=split.y.astype(np.int64), fletcher32=True)
            g.create_dataset("sample_id", data=split.ids.astype(np.int64), fletcher32=True)
            g.attrs["count"] = len(split.y)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files, self.x, self.groups = [], [], []


def make_splits(source: Source, val_fraction: float, seed: int, order: np.ndarray | None = None) -> dict[str, Split]:
    """train / val (stratified, seeded, carved from the source's training split) / test. ``order``:
    content ids of the training images (the draw follows them, not file order)."""
    kept, held = stratified_split(source.train.y, val_fraction, seed, "--val-fraction", order)
    splits = {"train": source.train.take(kept), "val": source.train.take(held)}
    if source.test is not None:
        splits["test"] = source.test
    for name, split in splits.items():
        if len(split.y) == 0:
            raise UserError(f"the {name} split is empty; use more data or another --val-fraction")
    return splits


@contextlib.contextmanager
def quiet_disk_full():
    """h5py frees its HDF5 objects in ``__dealloc__``, where a write that fails for lack of space is
    printed as a traceback (twice: ``sys.excepthook``, then ``sys.unraisablehook``) instead of raised. The
    failure is reported in one line by the writer; these tracebacks are left out, any other one is not."""
    def full(e) -> bool:
        return "No space left on device" in str(e) or "errno = 28," in str(e)

    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda t, e, tb: None if full(e) else excepthook(t, e, tb)
    sys.unraisablehook = lambda u: None if full(u.exc_value) else unraisablehook(u)
    try:
        yield
    finally:
        sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


class DiskFull(UserError):
    """The output's file system filled up half-way. HDF5 still holds unflushable buffers of the removed
    files, which its teardown at exit may crash on: the entry point leaves without it (``os._exit``)."""


def mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


class Terminated(BaseException):
    """SIGTERM (scancel, a killed job): unwinds like Ctrl-C so the partial output is removed."""


_SIGNALLED: list = []
STOPS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}


def terminate(signum, frame):
    """SIGINT's and SIGTERM's handler. Python may run it inside a weakref callback or ``__del__``, where
    the raised exception is printed and dropped (seen in CI, both signals: the conversion then finished,
    exit 0 or a traceback), so it also leaves a flag that the next chunk boundary, and the final rename,
    raise again."""
    _SIGNALLED.append(signum)
    raise STOPS.get(signum, Terminated)()


def check_terminated() -> None:
    if _SIGNALLED:
        raise STOPS.get(_SIGNALLED[0], Terminated)()


@quiet_disk_full()
def write_dataset(source: Source, out: str, grid, overlap: int, margin: int, val_fraction: float,
                  seed: int, force: bool = False, full: bool = True, progress: bool | None = None,
                  ranks: Ranks | None = None, order: np.ndarray | None = None, extra: dict | None = None,
                  chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Write manifest.json, sub_XXX.h5 for every subdomain and full.h5, streaming the source chunk by
    chunk (every rank of ``ranks`` decodes a slice; rank 0 writes); return the manifest.
    ``order``: the training images' content ids, which order the validation draw."""
    ranks = ranks or Ranks()
    ranks.agree(lambda: check_output(out, force, source.files))
    source.train = Split(Images.of(source.train.x), source.train.y, source.train.ids)
    if source.test is not None:
        source.test = Split(Images.of(source.test.x), source.test.y, source.test.ids)
    shape0, dtype = source.train.x.shape[1:], source.train.x.dtype
    deco = Decomposition(shape0[1:], grid, overlap)
    if margin < 0:
        raise UserError(f"--margin {margin}: expected a non-negative number of pixels")
    splits = make_splits(source, val_fraction, seed, order)
    scale = 1.0 / 255.0 if dtype == np.uint8 else 1.0
    checksum = file_checksum(source.files) if ranks.is_root else None
    options = dict(grid=list(deco.grid), overlap=overlap, margin=margin, val_fraction=val_fraction,
                   seed=seed, shape=list(shape0), n={k: len(v.y) for k, v in splits.items()})
    if order is not None:
        options["draw"] = "content"
    prep_id = (hashlib.sha256((checksum + json.dumps(options, sort_keys=True) + __version__).encode()).hexdigest()[:16]
               if ranks.is_root else None)
    ranks.agree(lambda: check_space(out, output_bytes(deco, splits, margin, shape0, dtype, full)))
    rows = chunk_rows(shape0, dtype.itemsize, chunk_bytes)
    stats = ChannelStats(shape0[0], scale)
    tmp = files = owner = None
    names = [shard_name(i) for i in range(deco.n)] + ([FULL_NAME] if full else [])
    bar = Progress(sum(len(s.y) for s in splits.values()) * len(names), f"writing {deco.n} shards",
                   progress if ranks.is_root else False)
    parent = os.path.dirname(os.path.abspath(out))
    try:
        if ranks.is_root:
            remove_leftovers(out, say=progress is not False)
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
            owner = take_ownership(tmp)
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would survive the rename
            common = {"format_version": FORMAT_VERSION, "grid": list(deco.grid), "overlap": overlap,
                      "margin": margin, "prep_id": prep_id, "image_shape": list(shape0),
                      "num_classes": len(source.classes)}
            attrs = [dict(common, index=i, box=np.asarray(deco.box(i), dtype=np.int64)) for i in range(deco.n)]
            cuts = [lambda b, i=i: deco.cut(b, i, margin) for i in range(deco.n)]
            if full:
                attrs.append(dict(common, index=-1, box=np.asarray([(0, s) for s in deco.image_shape], dtype=np.int64)))
                cuts.append(lambda b: b)
            files = ShardFiles(tmp, names, attrs, cuts, margin, bar)
        for name, split in splits.items():
            if files:
                files.begin(name, len(split.y), shape0, dtype)
            for a, b in chunks(len(split.y), rows):
                check_terminated()
                block = ranks.read(split.x, np.arange(a, b))
                if files:
                    if name == "train":
                        stats.add(block)
                    files.write(a, block)
                block = None  # not alive while the next chunk decodes: one chunk in memory at a time
                release_freed_memory()
            if files:
                files.end(name, split)
        manifest = None
        if ranks.is_root:
            files.close()
            mean, std = stats.result()
            manifest = _manifest(source, deco, splits, shape0, dtype, overlap, margin, scale, mean, std, checksum,
                                 seed, val_fraction, prep_id, full, files.shapes[:deco.n], order, extra)
            with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            bar.close()
            check_terminated()
            os.unlink(os.path.join(tmp, OWNER))  # not part of the output; the lock holds until owner is closed
            _move_into_place(tmp, out, parent)
            COMPLETE.add(os.path.abspath(out))
    except OSError as e:
        writing = files.writing if files else "the output folder"
        failed = re.search(r"filename = '([^']+)'", str(e))  # HDF5 reports a cached chunk's file late
        if failed and files and not writing.startswith(os.path.basename(failed.group(1))):
            writing = f"{os.path.basename(failed.group(1))} (found while writing {writing})"
        _discard(files, tmp, bar)
        if e.errno in (errno.ENOSPC, errno.EDQUOT) or "errno = 28," in str(e):  # HDF5 words ENOSPC its own way
            raise DiskFull(f"{out}: the file system at {mount_point(parent)} filled up while writing {writing} "
                           f"(No space left on device); nothing was written (partial files removed): free space "
                           f"and run again") from None
        raise
    except BaseException:
        _discard(files, tmp, bar)
        raise
    finally:
        if owner is not None:
            owner.close()
    return ranks.bcast(manifest)


def _discard(files, tmp, bar) -> None:
    """Remove the partial output. A launcher follows Ctrl-C with SIGTERM (Open MPI's mpirun), which must
    not cut the removal short: both wait until it is done."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        bar.close()
        if files:
            try:  # an HDF5 file on a full disk cannot close cleanly (nor its datasets): it is deleted anyway
                files.close()
            except Exception:
                pass
            gc.collect()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


COMPLETE: set[str] = set()  # outputs this process moved into place: a stop that comes later keeps them
OWNER = ".owner"  # in a temporary output folder: locked (flock) by the process writing it
STALE_AFTER = 3600.0  # seconds after which a temporary folder without a lock of its own is left over


def take_ownership(tmp: str):
    """Hold an exclusive lock on ``tmp/.owner`` while writing: a later preparation of the same OUT then
    tells a live writer's folder from one a killed writer left behind (the kernel drops a dead
    process's locks). Returns the open file; closing it releases the lock."""
    f = open(os.path.join(tmp, OWNER), "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def leftovers(out: str) -> list[str]:
    """Hidden folders an interrupted preparation of ``out`` left beside it (``.OUT.tmp-*`` of a writer
    that is gone, ``.OUT.old-*`` of a replacement cut short), which no live process writes."""
    return _hidden_folders(out)[1]


def _hidden_folders(out: str) -> tuple[list[str], list[str]]:
    """``out``'s hidden folders: (written by a live process or too young to judge, left over)."""
    parent, base = os.path.dirname(os.path.abspath(out)), os.path.basename(os.path.abspath(out))
    live, left = [], []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        path = os.path.join(parent, name)
        if not (name.startswith(f".{base}.tmp-") or name.startswith(f".{base}.old-")) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, OWNER)) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: its writer is gone
        except BlockingIOError:
            live.append(path)  # a live preparation writes it
            continue
        except OSError:
            try:
                if time.time() - os.stat(path).st_mtime < STALE_AFTER:
                    live.append(path)  # no lock file (yet, or a replacement under way): judged by age
                    continue
            except OSError:
                continue
        left.append(path)
    return live, left


def wait_for_discard(out: str, limit: float) -> None:
    """Wait (at most ``limit`` s) until no live writer's hidden folder of ``out`` is left. A rank that
    leaves on a stop waits here: MPICH's launcher kills every rank as soon as one exits, which cut
    rank 0's removal of its partial output short (measured: a 0.3 s clean-up never finished)."""
    deadline = time.monotonic() + limit
    while _hidden_folders(out)[0] and time.monotonic() < deadline:
        time.sleep(0.05)


def remove_leftovers(out: str, say: bool) -> None:
    for path in leftovers(out):
        shutil.rmtree(path, ignore_errors=True)
        if say:
            print(f"data_prep: removed {path}, left by an interrupted preparation of {out}", file=sys.stderr,
                  flush=True)


def _move_into_place(tmp: str, out: str, parent: str) -> None:
    if os.path.exists(out):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.old-", dir=parent)
        os.rename(out, os.path.join(trash, "old"))
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _manifest(source, deco, splits, shape0, dtype, overlap, margin, scale, mean, std, checksum, seed,
              val_fraction, prep_id, full, shapes, order, extra) -> dict:
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": f"hpcdd {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": source.name,
        "classes": list(source.classes),
        "num_classes": len(source.classes),
        "splits": {name: len(split.y) for name, split in splits.items()},
        "image_shape": list(shape0),
        "dims": deco.dims,
        "grid": list(deco.grid),
        "overlap": overlap,
        "margin": margin,
        "boxes": [[list(b) for b in box] for box in deco.boxes()],
        "dtype": str(dtype),
        "scale": scale,
        "mean": mean,
        "std": std,
        "source": {"kind": source.kind, "description": source.description,
                   "files": [os.path.abspath(p) for p in (source.recorded or source.files)],
                   "file_count": len(source.files), "sha256": checksum},
        "seed": seed,
        "val_fraction": val_fraction,
        "prep_id": prep_id,
        "sample_ids": ("position in the source: training images, then test images, in the source's order "
                       "(image folders: class folder, then file name)"),
        "split_draw": ("content: the seeded draws (test, validation, --max-*) run over the images sorted by a "
                       "hash of their pixels, so they do not depend on file order or format"
                       if order is not None else "position: the seeded draws run over the images in source order"),
        "sample_ids_sha256": {name: ids_digest(split.ids) for name, split in splits.items()},
        "labels_sha256": {name: ids_digest(split.y) for name, split in splits.items()},
        "shards": [shard_name(i) for i in range(deco.n)],
        "full": FULL_NAME if full else None,
        "subimage_shapes": shapes,
        **(extra or {}),
    }
    return dict(manifest, manifest_sha256=seal(manifest))


def output_bytes(deco, splits: dict, margin: int, shape0, dtype, full: bool) -> int:
    """What the shards take on disk (uncompressed pixels, labels and ids, plus HDF5 overhead)."""
    per_sample = sum(float(np.prod([b - a + 2 * margin for a, b in deco.box(i)])) for i in range(deco.n))
    if full:
        per_sample += float(np.prod([s + 2 * margin for s in deco.image_shape]))
    n = sum(len(s.y) for s in splits.values())
    return int(n * (per_sample * shape0[0] * np.dtype(dtype).itemsize + 16 * (deco.n + full)) + (1 << 20) * (deco.n + 1))


def check_space(out: str, need: int) -> None:
    """Refuse before writing when the shards cannot fit (HDF5 may crash outright on a full disk)."""
    parent = os.path.dirname(os.path.abspath(out))
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UserError(f"{out}: the shards need about {need / 1e9:.2f} GB but its file system has {free / 1e9:.2f} GB "
                        f"free; free space, write elsewhere, or choose a coarser grid/smaller --size")
