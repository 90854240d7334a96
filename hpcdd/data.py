"""Shards: reading the HDF5 files that ``data_prep`` writes (format: docs/shard-format.md).

A reader opens its file read-only inside the process that reads it, never before a fork, and
leaves file locking to HDF5 (so ``HDF5_USE_FILE_LOCKING=FALSE`` works on parallel file systems).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .manifest import FORMAT_VERSION, Manifest
from .parallel.watchdog import alive

DEFAULT_MEMORY_LIMIT = 4 << 30
STREAM_BLOCK = 1024  # rows of a streamed shard read in one piece


@dataclass(frozen=True)
class StreamPlan:
    """How a training streams: ``block`` rows read at a time, ``window`` rows shuffled together."""

    block: int
    window: int


def stream_plan(manifest: Manifest, indices, split: str, memory_limit: int) -> StreamPlan | None:
    """None when the split of every shard a training reads (``indices``; None: full.h5) fits in
    ``memory_limit`` as float32; else the chunk-aware plan of that training. A function of the
    manifest only, so every rank and every subdomain of one training agree on it. A window takes at
    most a quarter of the limit (the one in use, the one being read ahead, and slack)."""
    n = manifest.count(split)
    sample = max(int(np.prod(manifest.stored_shape(i))) * 4 for i in indices)
    if n * sample <= memory_limit:
        return None
    window = max(STREAM_BLOCK, min(n, memory_limit // (4 * sample)) // STREAM_BLOCK * STREAM_BLOCK)
    return StreamPlan(STREAM_BLOCK, window)


def _identity(path: str) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


class ShardReader:
    """Read one shard (``index`` a subdomain, or ``None`` for ``full.h5``) of a prepared dataset."""

    def __init__(self, manifest: Manifest, index: int | None):
        self.manifest = manifest
        self.data_dir = manifest.data_dir
        self.index = index
        self.path = manifest.shard_path(index)
        self._file, self._identity = None, None

    def open(self):
        """Open read-only in this process (call after any fork)."""
        import h5py

        if self._file is None:
            if not os.path.isfile(self.path):
                raise UserError(f"{self.path}: missing shard; re-run data_prep for {self.data_dir}")
            try:
                self._file = h5py.File(self.path, "r")
                prep_id = self._file.attrs.get("prep_id")
            except OSError as e:
                raise UserError(f"{self.path}: not a readable HDF5 file ({_short(e)})") from None
            prep_id = prep_id.decode() if isinstance(prep_id, bytes) else prep_id
            self._identity = _identity(self.path)
            if self.manifest.opened.setdefault(self.path, self._identity) != self._identity:
                self.close()
                raise UserError(self._changed())
            if prep_id is not None and prep_id != self.manifest.prep_id:
                self.close()
                raise UserError(f"{self.path}: holds prep id {prep_id} but the manifest says {self.manifest.prep_id}: "
                                f"shards come from different data_prep runs (or {self.data_dir} was prepared again "
                                f"while the run reads it; stopped so results do not mix two preparations)")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def check_unchanged(self) -> None:
        """The file is still the one this run opened (inode, size, modification time): a shard copied
        over, or rewritten, while a run reads it would mix two datasets silently."""
        try:
            now = _identity(self.path)
        except OSError:
            now = None
        if now != self._identity:
            raise UserError(self._changed())

    def _changed(self) -> str:
        return (f"{self.path}: changed on disk since this run first opened it (another file copied over it, or it "
                f"was rewritten); stopped so results do not mix two datasets: prepare into a new folder and "
                f"start a new run")

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def expected_shape(self) -> tuple[int, ...]:
        return self.manifest.stored_shape(self.index)

    def validate(self, deep: bool = False) -> None:
        """Check this shard against the manifest: attributes, shapes, sample ids (and pixels if deep)."""
        f = self.open()
        m = self.manifest
        where = self.path
        try:
            attrs = dict(f.attrs)
            checks = [("format_version", FORMAT_VERSION), ("prep_id", m.prep_id),
                      ("grid", list(m.grid)), ("overlap", m.overlap), ("margin", m.margin)]
            for key, want in checks:
                got = attrs.get(key)
                got = got.tolist() if isinstance(got, np.ndarray) else got
                got = got.decode() if isinstance(got, bytes) else got
                if got != want:
                    raise UserError(f"{where}: attribute {key} is {got!r} but the manifest says {want!r}; "
                                    f"shards come from different data_prep runs")
            if self.index is not None and np.asarray(attrs.get("box")).tolist() != [list(a) for a in m.boxes[self.index]]:
                raise UserError(f"{where}: box differs from the manifest's box for subdomain {self.index}")
            shape = self.expected_shape()
            for split, n in m.splits.items():
                if split not in f:
                    raise UserError(f"{where}: missing split group {split!r}")
                g = f[split]
                for key in ("x", "y", "sample_id"):
                    if key not in g:
                        raise UserError(f"{where}: missing dataset {split}/{key}")
                if tuple(g["x"].shape) != (n,) + shape:
                    raise UserError(f"{where}: {split}/x has shape {tuple(g['x'].shape)}, expected {(n,) + shape}")
                if g["y"].shape != (n,) or g["sample_id"].shape != (n,):
                    raise UserError(f"{where}: {split}/y or sample_id do not hold {n} entries")
                if ids_digest(g["sample_id"][:]) != m.sample_ids_sha256[split]:
                    raise UserError(f"{where}: {split} sample ids differ from the manifest; "
                                    f"shards come from different data_prep runs")
                y = g["y"][:]
                if n and (y.min() < 0 or y.max() >= m.k):
                    raise UserError(f"{where}: {split} labels outside 0..{m.k - 1}")
                if ids_digest(y) != m.labels_sha256[split]:
                    raise UserError(f"{where}: {split} labels differ from the manifest's (the shard was changed "
                                    f"after data_prep wrote it); re-run data_prep")
                if deep:
                    self._check_pixels(split, f"{where}: {split}/x")
        except UserError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"{where}: corrupt or truncated HDF5 file ({_short(e)})") from None

    def _check_pixels(self, split: str, where: str) -> None:
        g = self._group(split)
        ds = g["x"]
        step = max(1, ds.chunks[0] if ds.chunks else 1024) * 64
        for a in range(0, ds.shape[0], step):
            block = self.pixels(split, a, a + step, group=g)
            if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
                raise UserError(f"{where}: contains NaN or Inf pixels")

    def pixels(self, split: str, a: int, b, index=None, group=None) -> np.ndarray:
        """Rows a..b of ``split``'s images (or the sorted rows ``index``). HDF5 verifies each chunk's
        checksum as it reads it; a damaged chunk stops the run in one line naming shard, split and chunk.
        ``group``: the split's group, when the caller has just checked the file (``_group``)."""
        ds = (self._group(split) if group is None else group)["x"]
        try:
            return ds[a:b] if index is None else ds[index]
        except (OSError, RuntimeError) as e:
            if index is not None and len(index):
                a, b = int(index[0]), int(index[-1]) + 1
            raise UserError(self._damaged(split, ds, a, min(b, ds.shape[0]), e)) from None

    def _damaged(self, split: str, ds, a: int, b: int, error: BaseException) -> str:
        """The one line for a failed read of rows a..b: the chunk that fails, read one chunk at a time."""
        rows = ds.chunks[0] if ds.chunks else max(1, b - a)
        for c in range(a // rows, -(-b // rows)):
            lo, hi = c * rows, min((c + 1) * rows, ds.shape[0])
            try:
                ds[lo:hi]
            except (OSError, RuntimeError) as e:
                why = "checksum mismatch" if "filter returned failure" in str(e) else _short(e)
                return (f"{self.path}: damaged data in {split}/x chunk {c} (images {lo}..{hi - 1}): {why}; the "
                        f"file changed after data_prep wrote it: re-run data_prep")
        return f"{self.path}: corrupt or truncated HDF5 data in {split} ({_short(error)})"

    def read(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole split in memory: (x, y, sample_id)."""
        g = self._group(split)
        x = self.pixels(split, 0, None, group=g)
        try:
            return x, g["y"][:].astype(np.int64), g["sample_id"][:].astype(np.int64)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{self.path}: corrupt or truncated HDF5 data in {split} ({_short(e)})") from None

    def read_rows(self, split: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows in any order (read sorted, as HDF5 requires, then put back in the asked order)."""
        g = self._group(split)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        uniq, inverse = np.unique(sorted_rows, return_inverse=True)
        x = self.pixels(split, 0, 0, uniq, group=g)[inverse]
        y = g["y"][uniq][inverse]
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return x[back], y[back].astype(np.int64)

    def iter_chunks(self, split: str, rows_per_read: int = 8192):
        """Stream a split in order, ``rows_per_read`` samples at a time: yields (x, y, sample_id)."""
        g = self._group(split)
        n = g["x"].shape[0]
        for a in range(0, n, rows_per_read):
            alive()
            yield (self.pixels(split, a, a + rows_per_read), g["y"][a:a + rows_per_read],
                   g["sample_id"][a:a + rows_per_read])

    def nbytes(self, split: str) -> int:
        ds = self._group(split)["x"]
        return int(np.prod(ds.shape)) * ds.dtype.itemsize

    def _group(self, split: str):
        f = self.open()
        self.check_unchanged()
        if split not in f:
            raise UserError(f"{self.path}: missing split group {split!r}")
        return f[split]


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


@dataclass
class SplitData:
    """One split of one shard ready for training: normalised float32 in memory, or streamed.

    ``x`` keeps the stored margin; ``batch`` crops it (shifted for augmentation, centred otherwise).
    """

    reader: ShardReader
    split: str
    x: "object"  # torch.Tensor (n, C, *spatial_with_margin) or None when streaming
    y: "object"  # torch.Tensor (n,)
    ids: np.ndarray
    mean: "object"
    std: "object"
    scale: float
    margin: int
    plan: StreamPlan | None = None  # the training's order (chunk-aware when any of its shards streams)
    mirror: "SplitData | None" = None  # the mirror subdomain's split, which a flipped sample shows flipped
    _windows: "object" = None

    @classmethod
    def load(cls, reader: ShardReader, split: str, memory_limit: int = DEFAULT_MEMORY_LIMIT,
             plan: StreamPlan | None | str = "own") -> "SplitData":
        """In memory when it fits in ``memory_limit``, else streamed. ``plan``: the training's
        (``stream_plan`` over all its shards); "own": this shard's alone."""
        import torch

        m = reader.manifest
        view = (1, m.channels) + (1,) * m.dims
        mean = torch.tensor(m.mean, dtype=torch.float32).view(view)
        std = torch.tensor(m.std, dtype=torch.float32).view(view)
        n = m.count(split)
        g = reader._group(split)
        ids = g["sample_id"][:].astype(np.int64)
        y = torch.from_numpy(g["y"][:].astype(np.int64))
        in_memory = n * int(np.prod(reader.expected_shape())) * 4 <= memory_limit
        if plan == "own":
            plan = stream_plan(m, [reader.index], split, memory_limit)
        self = cls(reader, split, None, y, ids, mean, std, m.scale, m.margin, plan)
        if in_memory:
            xs = []
            for x, _, _ in reader.iter_chunks(split):
                xs.append(self._normalise(torch.from_numpy(x)))
            self.x = torch.cat(xs) if xs else torch.zeros((0,) + reader.expected_shape())
        return self

    def __len__(self) -> int:
        return len(self.ids)

    def to_device(self, device) -> "SplitData":
        """Keep the images on the GPU (when they are in memory): no host-to-device copy per step.
        Labels stay on the host, where accuracy is counted."""
        if self.x is not None and str(device) != "cpu":
            self.x = self.x.to(device)
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @property
    def in_memory(self) -> bool:
        return self.x is not None

    @property
    def dims(self) -> int:
        return self.reader.manifest.dims

    def _normalise(self, x):
        return normalise(x, self.scale, self.mean, self.std)

    def close(self) -> None:
        if self._windows is not None:
            self._windows.close()
            self._windows = None
        self.reader.close()

    def schedule(self, order: np.ndarray, mirror: bool = True) -> None:
        """The epoch's row order (its minibatches in turn): a streamed split reads it window by
        window, one window ahead in a background thread (its mirror's too: flips read from it).
        An order already scheduled (a fused member that is another's mirror) is kept."""
        if self.x is None and self.plan is not None and (self._windows is None or self._windows.order is not order):
            if self._windows is not None:
                self._windows.close()
            self._windows = WindowReader(self, order, self.plan)
        if mirror and self.mirror is not None and self.mirror is not self:
            self.mirror.schedule(order, mirror=False)

    def _rows(self, rows: np.ndarray):
        """(x, y) of the given rows, normalised, with the stored margin; x a new tensor."""
        import torch

        if self.x is not None:
            idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
            return self.x.index_select(0, idx.to(self.x.device)), self.y.index_select(0, idx)
        if self._windows is not None and self._windows.covers(rows):
            return self._windows.rows(np.asarray(rows)), self.y.index_select(0, torch.from_numpy(np.asarray(rows)))
        xr, yr = self.reader.read_rows(self.split, np.asarray(rows))
        return self._normalise(torch.from_numpy(xr)), torch.from_numpy(yr)

    def batch(self, rows: np.ndarray, aug=None):
        """(x, y) for the given rows, cropped to the subimage; ``aug`` (``augmentation.Augmentation``
        of these rows): flipped samples are the mirror's subimages flipped, then every window shifted."""
        import torch

        x, y = self._rows(rows)
        if aug is None:
            return crop(x, self.margin), y
        if aug.flips is not None and aug.flips.any():
            if self.mirror is None:
                raise RuntimeError(f"{self.reader.path}: flipped samples need the mirror's split (DataCache mirrored=True)")
            flipped = np.flatnonzero(aug.flips)
            x[torch.from_numpy(flipped).to(x.device)] = self.mirror._rows(np.asarray(rows)[flipped])[0].flip(-1)
        return crop(x, self.margin, aug.shifts), y


class MemberData:
    """The same split of several subdomains read as one, for a fused model (hpcdd/fused.py): a batch
    is the members' subimages stacked along channels (B, G*C, ...) and their labels (B, G)."""

    def __init__(self, splits: list):
        self.splits = splits

    def __len__(self) -> int:
        return len(self.splits[0])

    @property
    def ids(self) -> np.ndarray:
        return self.splits[0].ids

    @property
    def dims(self) -> int:
        return self.splits[0].dims

    @property
    def plan(self):
        return self.splits[0].plan

    @property
    def y(self):
        import torch

        return torch.stack([s.y for s in self.splits], 1)

    def schedule(self, order: np.ndarray) -> None:
        for s in self.splits:
            s.schedule(order)

    def batch(self, rows: np.ndarray, aug=None):
        import torch

        parts = [s.batch(rows, aug) for s in self.splits]
        return torch.cat([x for x, _ in parts], 1), torch.stack([y for _, y in parts], 1)


class WindowReader:
    """One epoch of a streamed split, read a window at a time (whole blocks, contiguous reads),
    normalised in a background thread one window ahead of training.

    A row's window follows from the order alone: blocks first appear in window order and every
    window but the last holds ``window // block`` of them (``hpcdd.training.rng.chunked_permutation``).
    """

    def __init__(self, data: SplitData, order: np.ndarray, plan: StreamPlan):
        from concurrent.futures import ThreadPoolExecutor

        self.data, self.block, self.order = data, plan.block, order
        n = len(data)
        blocks = np.asarray(order, dtype=np.int64) // plan.block
        ids, first = np.unique(blocks, return_index=True)
        group = np.empty(-(-n // plan.block), dtype=np.int64)
        group[ids[np.argsort(first)]] = np.arange(len(ids)) // max(1, plan.window // plan.block)
        self.group = group
        self.windows = [np.flatnonzero(group == w) for w in range(int(group.max()) + 1 if len(ids) else 0)]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hpcdd-prefetch")
        self._loaded: dict = {}
        self.seen = np.zeros(n, dtype=bool)
        self.seen[np.asarray(order, dtype=np.int64)] = True

    def covers(self, rows) -> bool:
        return bool(self.seen[np.asarray(rows)].all())

    def _read(self, w: int):
        import torch

        reader, xs, rows = self.data.reader, [], []
        for b in self.windows[w]:  # each read checks the file is still the one opened (ShardReader._group)
            a, e = int(b) * self.block, min(int(b) * self.block + self.block, len(self.data))
            xs.append(self.data._normalise(torch.from_numpy(reader.pixels(self.data.split, a, e))))
            rows.append(np.arange(a, e))
        return np.concatenate(rows), torch.cat(xs)

    def _want(self, w: int):
        if w < len(self.windows) and w not in self._loaded:
            self._loaded[w] = self._pool.submit(self._read, w)

    def rows(self, rows: np.ndarray):
        import torch

        alive()
        ws = self.group[rows // self.block]
        wanted = np.unique(ws)
        for w in wanted:
            self._want(int(w))
        self._want(int(wanted.max()) + 1)
        for w in [w for w in self._loaded if w < wanted.min()]:
            self._loaded.pop(w)
        out = None
        for w in wanted:
            have, x = self._loaded[int(w)].result()
            sel = ws == w
            part = x.index_select(0, torch.from_numpy(np.searchsorted(have, rows[sel])))
            if out is None:
                out = torch.empty((len(rows),) + tuple(x.shape[1:]), dtype=x.dtype)
            out[torch.from_numpy(sel)] = part
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._loaded.clear()


def normalise(x, scale: float, mean, std):
    """Stored pixels to the network's input: scaled, then standardised per channel."""
    import torch

    return (x.to(torch.float32) * scale - mean) / std


@dataclass
class TensorData:
    """A split that is already a tensor (the DNN's inputs: local outputs (n, N, K)), read like a SplitData."""

    x: "object"
    y: "object"

    def __len__(self) -> int:
        return len(self.y)

    @property
    def ids(self) -> np.ndarray:
        return np.arange(len(self.y))

    dims = 0

    def batch(self, rows: np.ndarray, aug=None):
        import torch

        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return self.x.index_select(0, idx.to(self.x.device)), self.y.index_select(0, idx)


def crop(x, margin: int, shifts: np.ndarray | None = None):
    """Cut the subimage out of a batch stored with ``margin`` pixels around it.

    ``shifts`` (B, dims) in [-margin, margin] move the window per sample: the same global
    translation of the whole image seen through every subdomain.
    """
    if margin == 0:
        return x
    dims = x.dim() - 2
    size = [s - 2 * margin for s in x.shape[2:]]
    if shifts is None:
        return x[(Ellipsis,) + tuple(slice(margin, margin + s) for s in size)]
    import torch

    out = torch.empty(x.shape[:2] + tuple(size), dtype=x.dtype, device=x.device)
    keys = [tuple(s) for s in shifts.tolist()]
    for key in set(keys):
        sel = torch.tensor([b for b, k in enumerate(keys) if k == key], dtype=torch.long, device=x.device)
        window = tuple(slice(margin + key[d], margin + key[d] + size[d]) for d in range(dims))
        out[sel] = x[sel][(Ellipsis,) + window]
    return out
