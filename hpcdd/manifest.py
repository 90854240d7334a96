"""The manifest of a prepared dataset: ``DATA/manifest.json`` read once into a typed, frozen value.

Every field is checked for type and range here, in one schema, before any training starts, so a
hand-edited or foreign manifest is refused with one line naming the key (docs/shard-format.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from .atomic import read_json
from .decomposition import Decomposition
from .errors import UserError

FORMAT_VERSION = 2  # 2: checksummed datasets (fletcher32), label digests, a sealed manifest
MANIFEST_NAME = "manifest.json"
FULL_NAME = "full.h5"
SPLITS = ("train", "val", "test")


def shard_name(i: int) -> str:
    return f"sub_{i:03d}.h5"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_list(v, length=None) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v) and (length is None or len(v) == length)


# key -> (check, what is expected); checked in this order, so later checks may rely on earlier keys
_SCHEMA = (
    ("format_version", _is_int, "an integer"),
    ("dataset", lambda v: isinstance(v, str), "a string"),
    ("classes", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v),
     "a list of at least 2 class names"),
    ("splits", lambda v: isinstance(v, dict) and set(SPLITS) <= set(v) and all(_is_int(n) and n >= 0 for n in v.values()),
     "an object with non-negative sample counts for train, val and test"),
    ("image_shape", lambda v: _int_list(v) and len(v) in (3, 4) and all(s >= 1 for s in v),
     "[C, H, W] or [C, D, H, W] of positive integers"),
    ("grid", lambda v: _int_list(v) and len(v) in (2, 3) and all(g >= 1 for g in v), "2 or 3 positive integers"),
    ("overlap", lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    ("margin", lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    ("boxes", lambda v: isinstance(v, list) and all(isinstance(b, list) and all(_int_list(a, 2) for a in b) for b in v),
     "a list of per-axis [start, stop] pairs"),
    ("dtype", lambda v: v in ("uint8", "float32"), "uint8 or float32"),
    ("scale", lambda v: _is_number(v) and v > 0, "a positive finite number"),
    ("mean", lambda v: isinstance(v, list) and len(v) >= 1 and all(_is_number(x) for x in v),
     "a list of finite numbers, one per channel"),
    ("std", lambda v: isinstance(v, list) and len(v) >= 1 and all(_is_number(x) and x > 0 for x in v),
     "a list of positive finite numbers, one per channel"),
    ("prep_id", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    ("sample_ids_sha256", lambda v: isinstance(v, dict) and all(isinstance(v.get(s), str) for s in SPLITS),
     "an object with a digest for train, val and test"),
    ("labels_sha256", lambda v: isinstance(v, dict) and all(isinstance(v.get(s), str) for s in SPLITS),
     "an object with a digest for train, val and test"),
    ("shards", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of file names"),
    ("full", lambda v: v is None or isinstance(v, str), "a file name or null"),
    ("manifest_sha256", lambda v: isinstance(v, str), "a string"),
)
SEAL = "manifest_sha256"


def seal(values: dict) -> str:
    """The digest of a manifest's own content (canonical JSON of every key but the seal): data_prep
    writes it, readers compare it, so a manifest edited into another dataset is refused."""
    body = {k: v for k, v in values.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a run needs to know about its data; fields as in docs/shard-format.md."""

    data_dir: str
    dataset: str
    classes: tuple[str, ...]
    splits: dict
    image_shape: tuple[int, ...]
    grid: tuple[int, ...]
    overlap: int
    margin: int
    boxes: tuple[tuple[tuple[int, int], ...], ...]
    dtype: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    prep_id: str
    sample_ids_sha256: dict
    labels_sha256: dict
    shards: tuple[str, ...]
    full: str | None
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    # each shard file's identity when this process first opened it (data.ShardReader): a file copied
    # over it later is refused whenever it is read again
    opened: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        """Number of subdomains."""
        return len(self.boxes)

    @property
    def k(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.image_shape[1:]

    @property
    def dims(self) -> int:
        return len(self.grid)

    def decomposition(self) -> Decomposition:
        return Decomposition(self.spatial, self.grid, self.overlap)

    def subimage_shape(self, i: int | None) -> tuple[int, ...]:
        """Spatial shape of subdomain ``i`` (``None``: the whole image), margin excluded."""
        if i is None:
            return self.spatial
        return tuple(stop - start for start, stop in self.boxes[i])

    def stored_shape(self, i: int | None) -> tuple[int, ...]:
        """(C, *spatial) of one stored sample of shard ``i``: the subimage plus the margin on every side."""
        return (self.channels,) + tuple(s + 2 * self.margin for s in self.subimage_shape(i))

    def count(self, split: str) -> int:
        return int(self.splits[split])

    def shard_path(self, i: int | None) -> str:
        return os.path.join(self.data_dir, FULL_NAME if i is None else self.shards[i])

    @classmethod
    def from_dict(cls, values: dict, data_dir: str, where: str = MANIFEST_NAME) -> "Manifest":
        """Check every field's type and range, then build; a UserError names the first bad key."""
        if not isinstance(values, dict):
            raise UserError(f"{where}: expected a JSON object")
        missing = [key for key, _, _ in _SCHEMA if key not in values]
        if missing:
            raise UserError(f"{where}: missing keys {', '.join(missing)}; re-run data_prep")
        if values["format_version"] != FORMAT_VERSION:
            raise UserError(f"{where}: shard format {values['format_version']!r}, this hpcdd reads format "
                            f"{FORMAT_VERSION}; re-run data_prep")
        for key, check, expected in _SCHEMA:
            if not check(values[key]):
                raise UserError(f"{where}: {key} = {_short(values[key])}: expected {expected}")
        if seal(values) != values[SEAL]:
            raise UserError(f"{where}: edited after data_prep (its content no longer matches its digest); re-run "
                            f"data_prep, or if the edit was deliberate: hpcdd-prep reseal {data_dir}")
        c = values["image_shape"][0]
        for key in ("mean", "std"):
            if len(values[key]) != c:
                raise UserError(f"{where}: {key} has {len(values[key])} values but the images have {c} channel(s)")
        if len(values["grid"]) != len(values["image_shape"]) - 1:
            raise UserError(f"{where}: grid {values['grid']} does not fit image_shape {values['image_shape']}")
        deco = Decomposition(values["image_shape"][1:], values["grid"], values["overlap"])
        if [[list(b) for b in box] for box in deco.boxes()] != values["boxes"]:
            raise UserError(f"{where}: boxes do not match grid {values['grid']} and overlap {values['overlap']}")
        if len(values["shards"]) != deco.n:
            raise UserError(f"{where}: {len(values['shards'])} shards listed for {deco.n} subdomains")
        return cls(
            data_dir=data_dir, dataset=values["dataset"], classes=tuple(values["classes"]),
            splits={s: int(values["splits"][s]) for s in SPLITS}, image_shape=tuple(values["image_shape"]),
            grid=tuple(values["grid"]), overlap=values["overlap"], margin=values["margin"],
            boxes=tuple(tuple(tuple(a) for a in box) for box in values["boxes"]), dtype=values["dtype"],
            scale=float(values["scale"]), mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]), prep_id=values["prep_id"],
            sample_ids_sha256=dict(values["sample_ids_sha256"]), labels_sha256=dict(values["labels_sha256"]),
            shards=tuple(values["shards"]),
            full=values["full"], raw=values)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_manifest(data_dir: str) -> Manifest:
    """Read and check ``DATA/manifest.json``."""
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir}: no such directory; prepare one with `python -m data_prep`")
    values = read_json(path, f"missing; is {data_dir} a directory written by data_prep?")
    return Manifest.from_dict(values, data_dir, path)
