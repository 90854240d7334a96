"""Readers of the supported source formats. Each returns a ``Source`` whose images are read on demand.

Images are ``(n, C, H, W)`` (2D) or ``(n, C, D, H, W)`` (3D), ``uint8`` (pixels in 0..255) or
``float32`` (any scale); labels are ``int64``; sample ids are positions in the source (train, then
test). Only labels, file names and array headers are held in memory: pixels come in chunks
(``Images.read``), so a conversion needs memory for one chunk, whatever the dataset's size.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from hpcdd.errors import UserError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class Images:
    """``n`` images of one shape and dtype, read by row numbers (ascending) in chunks.

    ``read(rows)`` returns an array ``(len(rows), C, ...)``; ``take(rows)`` is a lazy subset;
    ``hashes(rows)`` the content ids of those images (``content_ids``). A numpy array (or memmap)
    is wrapped by ``Images.of``.
    """

    def __init__(self, n: int, item_shape: tuple, dtype, read, files=None):
        self.n, self.item_shape, self.dtype, self._read = n, tuple(item_shape), np.dtype(dtype), read
        self.files = files  # one file per image (image folders), for messages and --skip-bad

    @classmethod
    def of(cls, a, convert=None, dtype=None, item_shape=None) -> "Images":
        if isinstance(a, Images):
            return a

        def read(rows):
            if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
                block = np.asarray(a[rows[0]:rows[-1] + 1])
            else:
                block = np.asarray(a[rows])
            return convert(block) if convert else block
        return cls(len(a), item_shape or a.shape[1:], dtype or a.dtype, read)

    @property
    def shape(self) -> tuple:
        return (self.n,) + self.item_shape

    def __len__(self) -> int:
        return self.n

    def read(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0,) + self.item_shape, self.dtype)
        return self._read(rows)

    def hashes(self, rows) -> np.ndarray:
        return content_ids(self.read(rows))

    def bad(self, rows) -> tuple[np.ndarray, list[str]]:
        """(hashes with -1 for undecodable images, their messages): for --skip-bad."""
        return self.hashes(rows), []

    def take(self, rows) -> "Images":
        return Subset(self, np.asarray(rows, dtype=np.int64))


class Subset(Images):
    """``base`` restricted to ``rows`` (a split, a --max-* subset): reads, hashes and checks go to ``base``."""

    def __init__(self, base: Images, rows: np.ndarray):
        self.base, self.rows = base, rows
        super().__init__(len(rows), base.item_shape, base.dtype, lambda r: base.read(rows[r]),
                         None if base.files is None else [base.files[i] for i in rows])

    def hashes(self, rows) -> np.ndarray:
        return self.base.hashes(self.rows[np.asarray(rows, dtype=np.int64)])

    def bad(self, rows):
        return self.base.bad(self.rows[np.asarray(rows, dtype=np.int64)])


def content_ids(x: np.ndarray) -> np.ndarray:
    """A 63-bit hash of each image's pixels (with dtype and shape): the same image gives the same
    value from any source format (a CIFAR pickle, a PNG of it), so a draw ordered by it is a
    function of the images, not of file order."""
    x = np.ascontiguousarray(x)
    tag = f"{x.dtype.str}{x.shape[1:]}".encode()
    out = np.empty(len(x), dtype=np.int64)
    for i in range(len(x)):
        h = hashlib.blake2b(x[i].tobytes(), digest_size=8, person=b"hpcdd-id")
        h.update(tag)
        out[i] = int.from_bytes(h.digest(), "little") >> 1
    return out


@dataclass
class Split:
    x: "Images | np.ndarray"
    y: np.ndarray
    ids: np.ndarray

    def take(self, rows) -> "Split":
        return Split(Images.of(self.x).take(rows), self.y[rows], self.ids[rows])


@dataclass
class Source:
    name: str
    kind: str
    classes: list[str]
    train: Split
    test: Split | None  # None: a single-split source; data_prep draws the test split (--test-fraction)
    files: list[str] = field(default_factory=list)
    description: str = ""
    cleanup: list = field(default_factory=list)  # temporary files to remove when done
    recorded: list | None = None  # what the manifest lists (an image folder: its root, not every file)
    info: dict = field(default_factory=dict)  # source-specific manifest entries (NIfTI: voxel spacing)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def close(self, abandon: bool = False) -> None:
        """Release temporary files and decoding processes; ``abandon``: stopped half-way (a signal, an
        error), so decoding processes are ended at once rather than waited for."""
        for f in self.cleanup:
            f.close(abandon) if isinstance(f, Decoder) else f.close()
        self.cleanup.clear()


def file_checksum(paths: list[str]) -> str:
    """sha256 over the bytes of the source files (in the given order)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _check_labels(y, num_classes: int | None, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise UserError(f"{where}: labels must be one-dimensional, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise UserError(f"{where}: labels must be integers, found non-integer values")
    elif y.dtype.kind not in "iub":
        raise UserError(f"{where}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise UserError(f"{where}: labels out of range: found {int(y.min())}, expected 0 or more")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise UserError(f"{where}: labels out of range: found {int(y.max())}, "
                        f"expected 0..{num_classes - 1} for {num_classes} classes")
    return y


def _check_counts(x, y, where: str) -> None:
    if len(x) != len(y):
        raise UserError(f"{where}: {len(x)} images but {len(y)} labels; expected the same count")
    if len(x) == 0:
        raise UserError(f"{where}: no samples")


# ---------------------------------------------------------------------------------------- idx
def _read_maybe_gzip(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: corrupt or truncated gzip file ({e})") from None
    return data


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_header(head: bytes, size: int, path: str):
    """(dtype, shape, offset) from an IDX header; ``size`` is the whole (uncompressed) length."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise UserError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = head[2], head[3]
    if code not in IDX_TYPES or ndim == 0:
        raise UserError(f"{path}: not an IDX file (unknown type code 0x{code:02x})")
    offset = 4 + 4 * ndim
    if size < offset or len(head) < offset:
        raise UserError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", head[4:offset])
    dtype = np.dtype(IDX_TYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if size - offset != expected:
        raise UserError(f"{path}: truncated or corrupt: header says shape {shape} ({expected} bytes) "
                        f"but the file holds {size - offset} bytes of data")
    return dtype, shape, offset


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (MNIST format), gzipped or raw, into memory (labels; small files)."""
    data = _read_maybe_gzip(path)
    dtype, shape, offset = _idx_header(data[:64], len(data), path)
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def map_idx(path: str, cleanup: list) -> np.ndarray:
    """An IDX file as a read-only memmap; a gzipped one is first inflated, chunk by chunk, into an
    unnamed temporary file (removed when the source is closed)."""
    try:
        f = open(path, "rb")
        magic = f.read(2)
        f.seek(0)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if magic == b"\x1f\x8b":
        raw = tempfile.TemporaryFile(dir=os.environ.get("TMPDIR"))
        try:
            with f, gzip.GzipFile(fileobj=f) as z:
                shutil.copyfileobj(z, raw, 1 << 22)
        except (OSError, EOFError, zlib.error) as e:
            raw.close()
            raise UserError(f"{path}: corrupt or truncated gzip file ({e})") from None
        f = raw
    cleanup.append(f)
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    dtype, shape, offset = _idx_header(f.read(64), size, path)
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)


def _find_one(directory: str, split: str, what: str) -> str | None:
    words = {"train": ("train",), "test": ("t10k", "test")}[split]
    found = []
    for word in words:
        found += glob.glob(os.path.join(directory, f"*{word}*{what}*"))
    found = sorted(set(p for p in found if os.path.isfile(p)))
    if len(found) > 1:
        # prefer the gzipped twin only if both exist
        raw = [p for p in found if not p.endswith(".gz")]
        found = raw if len(raw) == 1 else found
    if len(found) > 1:
        raise UserError(f"{directory}: several {split} {what} files match ({', '.join(found)}); keep one")
    return found[0] if found else None


def load_idx(path: str, name: str | None = None) -> Source:
    """MNIST / Fashion-MNIST IDX files in one directory: {train,t10k}-{images,labels}-*."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a directory; expected a folder with train-images-idx3-ubyte[.gz] "
                        f"and train-labels-idx1-ubyte[.gz] (and t10k-* for the test split)")
    splits, files, cleanup = {}, [], []
    for split in ("train", "test"):
        images, labels = _find_one(path, split, "images"), _find_one(path, split, "labels")
        if split == "train" and (images is None or labels is None):
            missing = "train-images-idx3-ubyte[.gz]" if images is None else "train-labels-idx1-ubyte[.gz]"
            raise UserError(f"{path}: missing {missing}")
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            raise UserError(f"{path}: found {split} {'labels' if images is None else 'images'} "
                            f"but no matching {split} {'images' if images is None else 'labels'}")
        x, y = map_idx(images, cleanup), read_idx(labels)
        if x.ndim != 3:
            raise UserError(f"{images}: expected images (n, H, W), got shape {x.shape}")
        _check_counts(x, y, f"{images} / {labels}")
        y = _check_labels(y, 10, labels)
        splits[split] = (Images.of(_with_channel(x)) if x.dtype == np.uint8
                         else Images.of(_with_channel(x), lambda b: b.astype(np.uint8), np.uint8), y)
        files += [images, labels]
    xtr, ytr = splits["train"]
    train = Split(xtr, ytr, np.arange(len(ytr), dtype=np.int64))
    test = None
    if "test" in splits:
        xte, yte = splits["test"]
        if xte.shape[1:] != xtr.shape[1:]:
            raise UserError(f"{path}: test images are {xte.shape[2:]} but train images are {xtr.shape[2:]}")
        test = Split(xte, yte, len(ytr) + np.arange(len(yte), dtype=np.int64))
    label = (name or os.path.basename(os.path.normpath(path))).lower()
    classes = FASHION_CLASSES if "fashion" in label else [str(k) for k in range(10)]
    return Source(name or os.path.basename(os.path.normpath(path)), "idx", classes, train, test, files,
                  f"IDX files in {os.path.abspath(path)}", cleanup)


class _with_channel:
    """(n, H, W) seen as (n, 1, H, W) without a copy."""

    def __init__(self, a):
        self.a, self.shape, self.dtype = a, (a.shape[0], 1) + a.shape[1:], a.dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        return self.a[rows][:, None]


# ------------------------------------------------------------------------------------ cifar
def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise UserError(f"{path}: corrupt or truncated pickle ({type(e).__name__})") from None


def _cifar_batch(path: str, label_key: bytes, num_classes: int):
    d = _unpickle(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise UserError(f"{path}: not a CIFAR batch (expected keys b'data' and {label_key!r})")
    x = np.asarray(d[b"data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise UserError(f"{path}: b'data' must be uint8 (n, 3072), got {x.dtype} {x.shape}")
    y = np.asarray(d[label_key])
    _check_counts(x, y, path)
    return x.reshape(-1, 3, 32, 32), _check_labels(y, num_classes, path)


class _CifarImages:
    """The images of several CIFAR batch files, one file in memory at a time (rows come ascending)."""

    def __init__(self, paths: list[str], counts: list[int], label_key: bytes, k: int):
        self.paths, self.label_key, self.k = paths, label_key, k
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.shape, self.dtype = (int(self.starts[-1]), 3, 32, 32), np.dtype(np.uint8)
        self._cached = (None, None)

    def __len__(self):
        return self.shape[0]

    def _batch(self, j: int) -> np.ndarray:
        if self._cached[0] != j:
            self._cached = (j, _cifar_batch(self.paths[j], self.label_key, self.k)[0])
        return self._cached[1]

    def __getitem__(self, rows):
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        out = np.empty((len(rows), 3, 32, 32), np.uint8)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for j in np.unique(which):
            sel = which == j
            out[sel] = self._batch(int(j))[rows[sel] - self.starts[j]]
        return out


def load_cifar(path: str, name: str | None = None, hundred: bool = False) -> Source:
    """torchvision's ``cifar-10-batches-py`` (or ``cifar-100-python``) pickle directory."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a directory; expected torchvision's "
                        f"{'cifar-100-python' if hundred else 'cifar-10-batches-py'} folder")
    if hundred:
        meta_file, label_key, names_key, k = "meta", b"fine_labels", b"fine_label_names", 100
        train_files, test_files = ["train"], ["test"]
    else:
        meta_file, label_key, names_key, k = "batches.meta", b"labels", b"label_names", 10
        train_files, test_files = [f"data_batch_{j}" for j in range(1, 6)], ["test_batch"]
    meta = _unpickle(os.path.join(path, meta_file))
    if not isinstance(meta, dict) or names_key not in meta or len(meta[names_key]) != k:
        raise UserError(f"{os.path.join(path, meta_file)}: expected {names_key!r} with {k} class names")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    parts = {}
    for split, names in (("train", train_files), ("test", test_files)):
        paths = [os.path.join(path, f) for f in names]
        ys = [_cifar_batch(p, label_key, k)[1] for p in paths]  # one file at a time: labels only kept
        parts[split] = (Images.of(_CifarImages(paths, [len(y) for y in ys], label_key, k)), np.concatenate(ys))
    xtr, ytr = parts["train"]
    xte, yte = parts["test"]
    files = [os.path.join(path, f) for f in [meta_file] + train_files + test_files]
    return Source(name or ("cifar100" if hundred else "cifar10"), "cifar100" if hundred else "cifar10",
                  classes, Split(xtr, ytr, np.arange(len(ytr), dtype=np.int64)),
                  Split(xte, yte, len(ytr) + np.arange(len(yte), dtype=np.int64)), files,
                  f"CIFAR pickles in {os.path.abspath(path)}")


# ------------------------------------------------------------------------------ imagefolder
TORCHVISION_DECODES = (".jpg", ".jpeg", ".png", ".webp", ".gif")


# torchvision's ImageFolder conventions (``torchvision.datasets.folder``: IMG_EXTENSIONS, find_classes),
# kept here rather than imported: importing torchvision costs every decoding process 1-2 s and about
# 0.7 GB (torch); tests/test_data_prep.py checks that the two agree.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def _class_folders(path: str) -> list[str]:
    """Sorted sub-folders, as torchvision's ``find_classes``, without hidden ones."""
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def _image_files(folder: str, suffixes=IMAGE_SUFFIXES) -> list[str]:
    """Image files by extension (case-insensitive, as torchvision's ``has_file_allowed_extension``)."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(suffixes) and not f.startswith("."))


def _eight_bit(im, path: str):
    """16-bit greyscale (PNG, TIFF) scaled to 8 bits (v * 255 / 65535, rounded); PIL's own convert
    would clip every value above 255 to white."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UserError(f"{path}: {im.mode} image with values outside 0..65535; expected 8- or 16-bit images")
        top = 255.0 if im.mode == "I" and (not a.size or a.max() <= 255) else 65535.0
        return Image.fromarray(np.rint(a * (255.0 / top)).astype(np.uint8), "L")
    if im.mode == "F":
        raise UserError(f"{path}: floating-point image (mode F); expected 8- or 16-bit images, or use the npz source")
    return im


def check_image_memory(shape, itemsize: int, what: str) -> None:
    """Refuse, before decoding any, images that cannot fit in memory even one chunk at a time
    (e.g. an absurd --size): a chunk holds at least one image, about three copies of it."""
    need = 3 * float(np.prod(shape, dtype=np.float64)) * itemsize
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > 0.8 * avail:
        raise UserError(f"{what}: one image of {'x'.join(map(str, shape))} needs {need / 1e9:.1f} GB in memory while "
                        f"it is converted, but {avail / 1e9:.1f} GB are available; choose a smaller --size")


def _sixteen_bit_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] == 16


def decode_image_file(path: str, size, channels: int, decoder: str = "torchvision") -> np.ndarray:
    """One image file as (C, H, W) uint8, resized (bilinear, antialiased) to ``size`` if given.

    JPEG, PNG, WebP and GIF are decoded by ``torchvision.io.decode_image`` (libjpeg-turbo, libpng;
    measured at least as fast as PIL here, benchmarks/bench_data_prep.py); BMP, TIFF, PPM and
    16-bit PNGs (scaled, not clipped) go through PIL.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read image ({e.strerror})") from None
    if decoder == "torchvision" and path.lower().endswith(TORCHVISION_DECODES) and not _sixteen_bit_png(data):
        import torch
        from torchvision.io import ImageReadMode, decode_image

        try:
            t = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{path}: cannot decode image ({str(e).splitlines()[0][:120]})") from None
        if t.dim() == 4:  # an animated GIF: its first frame
            t = t[0]
        if size is not None and tuple(t.shape[1:]) != tuple(size):
            from torchvision.transforms.v2 import functional as TF

            t = TF.resize(t, list(size), antialias=True)
        return t.numpy()
    return _decode_pil(path, data, size, channels)


def _image_size(path: str) -> tuple[int, int]:
    """(H, W) from the file's header (PIL reads no pixels for it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode image ({e})") from None


def _decode_pil(path: str, data: bytes, size, channels: int) -> np.ndarray:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = _eight_bit(im, path)
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode image ({e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_many(paths: list[str], size, channels: int, what: str, decoder: str = "torchvision", window=None,
                 into: np.ndarray | None = None):
    """Worker task: "pixels" -> (n, C, H, W) (volumes: (n, 1, D, H, W)), written into ``into`` when given
    (decoding in place: no list of images and no second copy of the chunk); "hashes" -> content ids;
    "check" -> (ids, -1 where the file cannot be decoded, messages)."""
    if decoder in ("torchvision", "nifti"):
        import torch

        torch.set_num_threads(1)

    def decode(p):
        return decode_volume(p, size, window) if decoder == "nifti" else decode_image_file(p, size, channels, decoder)

    if what == "pixels" and into is not None:
        for j, p in enumerate(paths):
            a = decode(p)
            if a.shape != into.shape[1:]:
                raise UserError(f"{p}: an image of size {a.shape[1:]}, the others {into.shape[2:]}; give --size H W "
                                f"to resize them")
            into[j] = a
        return into
    if what == "pixels":
        out = [decode(p) for p in paths]
        shapes = {a.shape for a in out}
        if len(shapes) > 1:
            raise UserError(f"{paths[0]}: images of different sizes; give --size H W to resize them")
        return np.stack(out)
    ids, messages = np.full(len(paths), -1, np.int64), []
    for j, p in enumerate(paths):
        try:
            a = decode(p)
        except UserError as e:
            if what != "check":
                raise
            messages.append(str(e))
            continue
        ids[j] = content_ids(a[None])[0]
    return (ids, messages) if what == "check" else ids


class Decoder:
    """A pool of ``workers`` processes decoding image files (one process: decoded in place) with
    torchvision (default) or PIL (``pil``: no torch in the workers, about 0.5 GB less each)."""

    def __init__(self, workers: int = 1, start: str = "fork", library: str = "torchvision", window=None):
        self.workers, self.start, self.library, self._pool = max(1, workers), start, library, None
        self.window = window  # NIfTI volumes: the intensity window (library "nifti")
        self.stop_check = lambda: None  # called while waiting for the workers: raises to stop (data_prep.cli)

    def map(self, paths: list[str], size, channels: int, what: str, into: np.ndarray | None = None) -> list:
        """Each part's result, in order; "pixels" with ``into``: written there (as the parts arrive)."""
        pieces = max(1, min(len(paths), 4 * self.workers))
        bounds = np.linspace(0, len(paths), pieces + 1).astype(int)
        parts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if self.workers == 1 or len(parts) == 1:
            return [_decode_many(paths[a:b], size, channels, what, self.library, self.window,
                                 None if into is None else into[a:b]) for a, b in parts]
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork starts in milliseconds; under MPI, spawn (a forked MPI process is not safe everywhere)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(self.start),
                                             initializer=_quiet_worker)
        from concurrent.futures import FIRST_EXCEPTION, wait

        futures = [self._pool.submit(_decode_many, paths[a:b], size, channels, what, self.library, self.window)
                   for a, b in parts]
        while not wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION).not_done == set():
            self.stop_check()  # a SIGTERM whose exception Python dropped (in a fork or weakref callback)
            if any(f.done() and f.exception() is not None for f in futures):
                break
        if into is None:
            return [f.result() for f in futures]
        for k, (a, b) in enumerate(parts):
            part = futures[k].result()
            if part.shape[1:] != into.shape[1:]:
                raise UserError(f"{paths[a]}: images of size {part.shape[2:]}, the others {into.shape[2:]}; give "
                                f"--size H W to resize them")
            into[a:b] = part
            futures[k] = part = None  # the part is in ``into``: let it go before the next arrives
        return [into]

    def close(self, abandon: bool = False) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if not abandon:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            proc.terminate()
        for proc in processes:
            proc.join(2)


def _quiet_worker() -> None:
    """A decoding process leaves Ctrl-C to its parent, which stops it, and ends at SIGTERM without a
    word (a forked one inherits the parent's handler, which unwinds with a traceback)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class FolderImages(Images):
    """Image files (or NIfTI volumes: float32) decoded on demand by a ``Decoder``."""

    def __init__(self, files: list[str], size, channels: int, decoder: Decoder, dtype=np.uint8):
        self.size, self.channels, self.decoder = size, channels, decoder
        super().__init__(len(files), (channels,) + tuple(size), dtype, self._decode, files)

    def _decode(self, rows) -> np.ndarray:
        out = np.empty((len(rows),) + self.item_shape, self.dtype)
        self.decoder.map([self.files[i] for i in rows], self.size, self.channels, "pixels", into=out)
        return out

    def hashes(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros(0, np.int64)
        return np.concatenate(self.decoder.map([self.files[i] for i in rows], self.size, self.channels, "hashes"))

    def bad(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros(0, np.int64), []
        parts = self.decoder.map([self.files[i] for i in rows], self.size, self.channels, "check")
        return np.concatenate([p[0] for p in parts]), [m for p in parts for m in p[1]]


def _folder_split(root: str, classes: list[str], where: str, suffixes=IMAGE_SUFFIXES):
    files, labels = [], []
    for k, c in enumerate(classes):
        folder = os.path.join(root, c)
        found = _image_files(folder, suffixes) if os.path.isdir(folder) else []
        if not found:
            raise UserError(f"{folder}: empty class folder; expected {'volume' if suffixes == VOLUME_SUFFIXES else 'image'}"
                            f" files ({', '.join(suffixes[:3])}{', ...' if len(suffixes) > 3 else ''})")
        files += found
        labels += [k] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _folder_layout(path: str, kind: str, suffixes=IMAGE_SUFFIXES):
    """One folder of files per class, optionally under ``train/`` and ``test/`` (or ``val/``): the class
    names and the (files, labels) of the training split and of the test split (None if not split)."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a directory; expected one sub-folder of {kind} per class")
    top = _class_folders(path)
    presplit = "train" in top and ("test" in top or "val" in top)
    root = os.path.join(path, "train") if presplit else path
    classes = _class_folders(root)
    if not classes:
        raise UserError(f"{root}: no class folders; expected one sub-folder of {kind} per class")
    train = _folder_split(root, classes, root, suffixes)
    test = None
    if presplit:
        test_root = os.path.join(path, "test" if "test" in top else "val")
        if _class_folders(test_root) != classes:
            raise UserError(f"{test_root}: class folders differ from {root}")
        test = _folder_split(test_root, classes, test_root, suffixes)
    return root, classes, train, test


def _folder_splits(train, test, images):
    """Splits of a folder layout, ``images(files)`` reading each split's files; sample ids run on."""
    (files, y), out = train, [Split(images(train[0]), train[1], np.arange(len(train[1]), dtype=np.int64))]
    if test is not None:
        out.append(Split(images(test[0]), test[1], len(y) + np.arange(len(test[1]), dtype=np.int64)))
        files = files + test[0]
    return out[0], (out[1] if test is not None else None), files


def load_imagefolder(path: str, name: str | None = None, size=None, channels: int = 3,
                     decoder: Decoder | None = None) -> Source:
    """One folder per class of JPEG/PNG files (torchvision's ImageFolder layout); ``train/`` and
    ``test/`` (or ``val/``) subfolders if split. Nothing is decoded here but the first image (for
    its size when ``size`` is not given)."""
    decoder = decoder or Decoder()
    root, classes, train, test = _folder_layout(path, "images")
    if size is None:
        size = _image_size(train[0][0])
    check_image_memory((channels,) + tuple(size), 1, root)
    train, test, files = _folder_splits(train, test, lambda f: FolderImages(f, size, channels, decoder))
    return Source(name or os.path.basename(os.path.normpath(path)), "imagefolder", classes, train, test,
                  files, f"image folder {os.path.abspath(path)} resized to {size[0]}x{size[1]}", [decoder], [path])


# -------------------------------------------------------------------------------------- nifti
VOLUME_SUFFIXES = (".nii", ".nii.gz")


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise UserError("the nifti source needs nibabel: pip install 'hpcdd[nifti]' (or nibabel)") from None
    return nibabel


def decode_volume(path: str, size, window=None) -> np.ndarray:
    """One NIfTI volume as (1, D, H, W) float32: the array axes as stored in the file (no reorientation
    to RAS: D, H, W are the file's first, second and third axes), intensities clipped to ``window`` (LOW,
    HIGH in the file's units, e.g. Hounsfield) and scaled to 0..1, resampled trilinearly to ``size``."""
    nib = _nibabel()
    try:
        img = nib.load(path)
        a = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - nibabel, gzip and zlib each raise their own for a damaged file
        raise UserError(f"{path}: cannot read NIfTI volume ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else 'truncated or corrupt'})") from None
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise UserError(f"{path}: a {a.ndim}D image of shape {a.shape}; expected a 3D volume")
    if not np.all(np.isfinite(a)):
        raise UserError(f"{path}: contains NaN or Inf voxels")
    if window is not None:
        low, high = window
        a = (np.clip(a, low, high) - np.float32(low)) / np.float32(high - low)
    if tuple(a.shape) != tuple(size):
        import torch
        import torch.nn.functional as F

        a = F.interpolate(torch.from_numpy(np.ascontiguousarray(a))[None, None], size=tuple(size), mode="trilinear",
                          align_corners=False)[0, 0].numpy()
    return np.ascontiguousarray(a, dtype=np.float32)[None]


def volume_spacing(files: list[str]) -> dict:
    """Voxel spacing of the files (from their headers alone) as recorded in the manifest."""
    nib = _nibabel()
    spacings = []
    for path in files:
        try:
            zooms = [float(v) for v in nib.load(path).header.get_zooms()[:3]]
            spacings.append((zooms + [1.0] * 3)[:3])  # a 2D file is refused when it is decoded
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: cannot read NIfTI header ({type(e).__name__}: {str(e)[:120]})") from None
    s = np.asarray(spacings)
    return {"source_min": s.min(0).tolist(), "source_max": s.max(0).tolist(),
            "note": "spacing (mm) of the source volumes per axis, as stored; each was resampled to --size"}


def load_nifti(path: str, name: str | None, size, window, decoder: Decoder) -> Source:
    """One folder per class of NIfTI volumes (``.nii``, ``.nii.gz``), optionally under ``train/`` and
    ``test/``; every volume resampled to ``size`` (D, H, W) as it is decoded, float32 (0..1 with a window)."""
    _nibabel()
    root, classes, train, test = _folder_layout(path, "NIfTI volumes", VOLUME_SUFFIXES)
    check_image_memory((1,) + tuple(size), 4, root)
    train, test, files = _folder_splits(train, test, lambda f: FolderImages(f, size, 1, decoder, np.float32))
    what = f"NIfTI folder {os.path.abspath(path)} resampled to {'x'.join(map(str, size))}" + (
        f", window {window[0]:g}..{window[1]:g} scaled to 0..1" if window else "")
    source = Source(name or os.path.basename(os.path.normpath(path)), "nifti", classes, train, test, files, what,
                    [decoder], [path])
    source.info = {"voxel_spacing": volume_spacing(files), "orientation": "as stored: D, H, W are the file's "
                   "array axes 0, 1, 2 (no reorientation)", "window": list(window) if window else None}
    return source


# -------------------------------------------------------------------------------------- npz
def _npz_images(a, key: str, path: str, volume: bool | None) -> Images:
    """x as (n, C, H, W) or (n, C, D, H, W), converted chunk by chunk as it is read."""
    if a.dtype == object:
        raise UserError(f"{path}: {key} holds images of different sizes (object array); "
                        f"expected one array (n, H, W[, C]) with all images the same size")
    if a.dtype.kind not in "uif" and a.dtype != bool:
        raise UserError(f"{path}: {key} must be numeric, got dtype {a.dtype}")
    if volume is None:
        volume = a.ndim == 5 or (a.ndim == 4 and a.shape[-1] > 4)
    if not volume:
        if a.ndim == 3:
            order = None
        elif a.ndim == 4:
            order = (0, 3, 1, 2)
        else:
            raise UserError(f"{path}: {key} has shape {a.shape}; expected (n, H, W) or (n, H, W, C)")
    else:
        if a.ndim == 4:
            order = None
        elif a.ndim == 5:
            order = (0, 4, 1, 2, 3)
        else:
            raise UserError(f"{path}: {key} has shape {a.shape}; expected volumes (n, D, H, W[, C])")
    shape = a.shape[1:] if order is None else tuple(a.shape[i] for i in order[1:])
    if order is None:
        shape = (1,) + shape
    dtype = np.uint8 if a.dtype == np.uint8 else np.float32

    def convert(block):
        block = block[:, None] if order is None else block.transpose(order)
        if dtype == np.float32:
            block = block.astype(np.float32)
            if not np.all(np.isfinite(block)):
                raise UserError(f"{path}: {key} contains NaN or Inf values")
        return np.ascontiguousarray(block)

    return Images.of(a, convert, dtype, tuple(shape))


def _npy_header(f):
    """(shape, fortran_order, dtype) of an .npy stream (format 1.0 or 2.0), positioned at the data after."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        return None
    return read(f)


def _npz_member(z: zipfile.ZipFile, handle, key: str, path: str):
    """An uncompressed member as a read-only memmap (no copy in memory); a compressed one loaded."""
    info = z.getinfo(key + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
        handle.seek(info.header_offset)
        local = handle.read(30)
        if local[:4] == b"PK\x03\x04":
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            handle.seek(start)
            header = _npy_header(handle)
            shape, fortran, dtype = header or ((), True, np.dtype(object))
            if header and not fortran and not dtype.hasobject:
                if int(np.prod(shape)) == 0:
                    return np.zeros(shape, dtype)
                return np.memmap(handle, dtype=dtype, mode="r", offset=handle.tell(), shape=shape)
    with z.open(info) as f:
        header = _npy_header(f)
        if header and header[2].hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    return np.load(path, allow_pickle=False)[key]


def load_npz(path: str, name: str | None = None, volume: bool | None = None, num_classes=None) -> Source:
    """Arrays ``x`` and ``y`` (and optionally ``x_test``, ``y_test``, ``classes``) in one .npz; members
    stored uncompressed (``np.savez``) are memory-mapped, compressed ones (``savez_compressed``) loaded."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; expected an .npz with arrays x and y")
    try:
        handle = open(path, "rb")
        z = zipfile.ZipFile(handle)
        keys = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None

    def get(key):
        try:
            return _npz_member(z, handle, key, path)
        except ValueError as e:
            if "allow_pickle" in str(e) or "Object arrays" in str(e):
                raise UserError(f"{path}: {key} holds images of different sizes or Python objects; "
                                f"expected one numeric array with all images the same size") from None
            raise UserError(f"{path}: cannot read {key} ({e})") from None
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"{path}: corrupt or truncated ({key}: {e})") from None

    for key in ("x", "y"):
        if key not in keys:
            raise UserError(f"{path}: missing array {key!r}; found {sorted(keys) or 'none'}")
    classes = [str(c) for c in get("classes")] if "classes" in keys else None
    k = len(classes) if classes else num_classes
    x = _npz_images(get("x"), "x", path, volume)
    y = np.asarray(get("y"))
    _check_counts(x, y, f"{path} (x, y)")
    y = _check_labels(y, k, f"{path} (y)")
    test = None
    ids = np.arange(len(y), dtype=np.int64)
    if k is None:  # from every label, before any split can leave one empty
        k = int(max(y.max(initial=0), np.asarray(get("y_test")).max(initial=0) if "y_test" in keys else 0)) + 1
    if "x_test" in keys or "y_test" in keys:
        if not ("x_test" in keys and "y_test" in keys):
            raise UserError(f"{path}: x_test and y_test must come together")
        xt = _npz_images(get("x_test"), "x_test", path, len(x.shape) == 5)
        if xt.shape[1:] != x.shape[1:]:
            raise UserError(f"{path}: x_test images have shape {xt.shape[1:]} but x images {x.shape[1:]}; "
                            f"expected the same size")
        yt = np.asarray(get("y_test"))
        _check_counts(xt, yt, f"{path} (x_test, y_test)")
        yt = _check_labels(yt, k, f"{path} (y_test)")
        test = Split(xt, yt, len(y) + np.arange(len(yt), dtype=np.int64))
    if classes is None:
        classes = [str(c) for c in range(k)]
    return Source(name or os.path.splitext(os.path.basename(path))[0], "npz", classes, Split(x, y, ids), test,
                  [path], f"arrays in {os.path.abspath(path)}", [handle])


def _draw_order(n: int, order: np.ndarray | None) -> np.ndarray:
    """Positions sorted by ``order`` (content ids; ties by position), or as they are."""
    return np.arange(n) if order is None else np.lexsort((np.arange(n), order))


def stratified_split(y: np.ndarray, fraction: float, seed: int, option: str, order: np.ndarray | None = None):
    """Deterministic stratified split: indices (kept, held out), each sorted. With ``order``
    (content ids) the seeded draw runs over the samples sorted by it, so which images are held out
    does not depend on the order they come in."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"{option} {fraction}: expected a fraction between 0 and 1 (exclusive)")
    rng = np.random.default_rng(seed)
    ranked = _draw_order(len(y), order)
    held = []
    for c in np.unique(y):
        idx = ranked[y[ranked] == c]
        idx = idx[rng.permutation(len(idx))]
        held.append(idx[: int(round(fraction * len(idx)))])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(y)), held)
    return kept, held


def random_subset(n: int, keep: int, seed: int, order: np.ndarray | None = None) -> np.ndarray:
    """``keep`` of ``n`` positions, a seeded draw (over ``order`` if given), sorted."""
    return np.sort(_draw_order(n, order)[np.random.default_rng(seed).permutation(n)[:keep]])


SOURCES = ("idx", "cifar10", "cifar100", "imagefolder", "nifti", "npz")
