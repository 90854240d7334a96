"""Readers of the supported source formats. Each returns a ``Source`` with whole-image arrays.

Arrays are ``(n, C, H, W)`` (2D) or ``(n, C, D, H, W)`` (3D), ``uint8`` (pixels in 0..255) or
``float32`` (any scale); labels are ``int64``; sample ids are stable indices into the source.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import pickle
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hpcdd.errors import UserError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray


@dataclass
class Source:
    name: str
    kind: str
    classes: list[str]
    train: Split
    test: Split | None
    files: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


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


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (MNIST format), gzipped or raw."""
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UserError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes or ndim == 0:
        raise UserError(f"{path}: not an IDX file (unknown type code 0x{code:02x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(f"{path}: truncated or corrupt: header says shape {shape} ({expected} bytes) "
                        f"but the file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


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
    splits, files = {}, []
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
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3:
            raise UserError(f"{images}: expected images (n, H, W), got shape {x.shape}")
        _check_counts(x, y, f"{images} / {labels}")
        y = _check_labels(y, 10, labels)
        splits[split] = (x[:, None].astype(np.uint8), y)
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
                  f"IDX files in {os.path.abspath(path)}")


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
        xs, ys = zip(*(_cifar_batch(os.path.join(path, f), label_key, k) for f in names))
        parts[split] = (np.concatenate(xs), np.concatenate(ys))
    xtr, ytr = parts["train"]
    xte, yte = parts["test"]
    files = [os.path.join(path, f) for f in [meta_file] + train_files + test_files]
    return Source(name or ("cifar100" if hundred else "cifar10"), "cifar100" if hundred else "cifar10",
                  classes, Split(xtr, ytr, np.arange(len(ytr), dtype=np.int64)),
                  Split(xte, yte, len(ytr) + np.arange(len(yte), dtype=np.int64)), files,
                  f"CIFAR pickles in {os.path.abspath(path)}")


# ------------------------------------------------------------------------------ imagefolder
def _class_folders(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _image_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))


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


def _check_memory(count: int, shape, itemsize: int, what: str) -> None:
    """Refuse a conversion whose images cannot fit in memory, before decoding any (e.g. an absurd --size).
    Conversion holds about three copies (decoded, stacked, split)."""
    need = 3 * count * float(np.prod(shape, dtype=np.float64)) * itemsize
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > 0.8 * avail:
        raise UserError(f"{what}: {count} images of {'x'.join(map(str, shape))} need {need / 1e9:.1f} GB in memory, "
                        f"but {avail / 1e9:.1f} GB are available; choose a smaller --size or fewer images")


def _load_image(path: str, size: tuple[int, int] | None, channels: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = _eight_bit(im, path)
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode image ({e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _load_folder_split(root: str, classes: list[str], size, channels: int, where: str):
    files, labels = [], []
    for k, c in enumerate(classes):
        folder = os.path.join(root, c)
        found = _image_files(folder) if os.path.isdir(folder) else []
        if not found:
            raise UserError(f"{folder}: empty class folder; expected image files "
                            f"({', '.join(IMAGE_SUFFIXES[:3])}, ...)")
        files += found
        labels += [k] * len(found)
    if size is None:
        size = _load_image(files[0], None, channels).shape[1:]
    _check_memory(len(files), (channels,) + tuple(size), 1, where)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(lambda p: _load_image(p, size, channels), files))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"{where}: images of different sizes; give --size H W to resize them")
    return np.stack(images), np.asarray(labels, dtype=np.int64), files, tuple(size)


def load_imagefolder(path: str, name: str | None = None, size=None, channels: int = 3,
                     test_fraction: float = 0.2, seed: int = 0) -> Source:
    """One folder per class of JPEG/PNG files; ``train/`` and ``test/`` subfolders if split."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a directory; expected one sub-folder of images per class")
    top = _class_folders(path)
    presplit = "train" in top and ("test" in top or "val" in top)
    root = os.path.join(path, "train") if presplit else path
    classes = _class_folders(root)
    if not classes:
        raise UserError(f"{root}: no class folders; expected one sub-folder of images per class")
    x, y, files, size = _load_folder_split(root, classes, size, channels, root)
    if presplit:
        test_root = os.path.join(path, "test" if "test" in top else "val")
        if _class_folders(test_root) != classes:
            raise UserError(f"{test_root}: class folders differ from {root}")
        xte, yte, tfiles, _ = _load_folder_split(test_root, classes, size, channels, test_root)
        train = Split(x, y, np.arange(len(y), dtype=np.int64))
        test = Split(xte, yte, len(y) + np.arange(len(yte), dtype=np.int64))
        files += tfiles
    else:
        ids = np.arange(len(y), dtype=np.int64)
        tr, te = stratified_split(y, test_fraction, seed, "--test-fraction")
        train, test = Split(x[tr], y[tr], ids[tr]), Split(x[te], y[te], ids[te])
    return Source(name or os.path.basename(os.path.normpath(path)), "imagefolder", classes, train, test,
                  files, f"image folder {os.path.abspath(path)} resized to {size[0]}x{size[1]}")


# -------------------------------------------------------------------------------------- npz
def _npz_images(a: np.ndarray, key: str, path: str, volume: bool | None) -> np.ndarray:
    """Bring x to (n, C, H, W) or (n, C, D, H, W)."""
    if a.dtype == object:
        raise UserError(f"{path}: {key} holds images of different sizes (object array); "
                        f"expected one array (n, H, W[, C]) with all images the same size")
    if a.dtype.kind not in "uif" and a.dtype != bool:
        raise UserError(f"{path}: {key} must be numeric, got dtype {a.dtype}")
    if volume is None:
        volume = a.ndim == 5 or (a.ndim == 4 and a.shape[-1] > 4)
    if not volume:
        if a.ndim == 3:
            a = a[:, None]
        elif a.ndim == 4:
            a = a.transpose(0, 3, 1, 2)
        else:
            raise UserError(f"{path}: {key} has shape {a.shape}; expected (n, H, W) or (n, H, W, C)")
    else:
        if a.ndim == 4:
            a = a[:, None]
        elif a.ndim == 5:
            a = a.transpose(0, 4, 1, 2, 3)
        else:
            raise UserError(f"{path}: {key} has shape {a.shape}; expected volumes (n, D, H, W[, C])")
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise UserError(f"{path}: {key} contains NaN or Inf values")
    return np.ascontiguousarray(a)


def load_npz(path: str, name: str | None = None, volume: bool | None = None, num_classes=None,
             test_fraction: float = 0.2, seed: int = 0) -> Source:
    """Arrays ``x`` and ``y`` (and optionally ``x_test``, ``y_test``, ``classes``) in one .npz."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; expected an .npz with arrays x and y")
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None

    def get(key):
        try:
            return z[key]
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise UserError(f"{path}: {key} holds images of different sizes or Python objects; "
                                f"expected one numeric array with all images the same size") from None
            raise UserError(f"{path}: cannot read {key} ({e})") from None
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: corrupt or truncated ({key}: {e})") from None

    for key in ("x", "y"):
        if key not in keys:
            raise UserError(f"{path}: missing array {key!r}; found {sorted(keys) or 'none'}")
    classes = [str(c) for c in get("classes")] if "classes" in keys else None
    k = len(classes) if classes else num_classes
    x = _npz_images(get("x"), "x", path, volume)
    y = get("y")
    _check_counts(x, y, f"{path} (x, y)")
    y = _check_labels(y, k, f"{path} (y)")
    test = None
    ids = np.arange(len(y), dtype=np.int64)
    if k is None:  # from every label, before any split can leave one empty
        k = int(max(y.max(initial=0), get("y_test").max(initial=0) if "y_test" in keys else 0)) + 1
    if "x_test" in keys or "y_test" in keys:
        if not ("x_test" in keys and "y_test" in keys):
            raise UserError(f"{path}: x_test and y_test must come together")
        xt = _npz_images(get("x_test"), "x_test", path, x.ndim == 5)
        if xt.shape[1:] != x.shape[1:]:
            raise UserError(f"{path}: x_test images have shape {xt.shape[1:]} but x images {x.shape[1:]}; "
                            f"expected the same size")
        yt = get("y_test")
        _check_counts(xt, yt, f"{path} (x_test, y_test)")
        yt = _check_labels(yt, k, f"{path} (y_test)")
        train = Split(x, y, ids)
        test = Split(xt, yt, len(y) + np.arange(len(yt), dtype=np.int64))
    else:
        tr, te = stratified_split(y, test_fraction, seed, "--test-fraction")
        train, test = Split(x[tr], y[tr], ids[tr]), Split(x[te], y[te], ids[te])
    if classes is None:
        classes = [str(c) for c in range(k)]
    return Source(name or os.path.splitext(os.path.basename(path))[0], "npz", classes, train, test,
                  [path], f"arrays in {os.path.abspath(path)}")


def stratified_split(y: np.ndarray, fraction: float, seed: int, option: str):
    """Deterministic stratified split: indices (kept, held out), each sorted."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"{option} {fraction}: expected a fraction between 0 and 1 (exclusive)")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        held.append(idx[: int(round(fraction * len(idx)))])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(y)), held)
    return kept, held


SOURCES = ("idx", "cifar10", "cifar100", "imagefolder", "npz")
