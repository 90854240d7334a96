"""``python -m data_prep SOURCE INPUT OUT --grid 4x4 ...``: prepare HDF5 shards for hpcdd."""

from __future__ import annotations

import os
import sys
import time

from hpcdd.cli_util import OneLineParser
from hpcdd.decomposition import parse_grid
from hpcdd.errors import UserError, fail

from . import sources
from .writer import check_output, write_dataset


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="hpcdd-prep", description=(
        "Convert a dataset into HDF5 shards, one per subdomain of the decomposition, plus full.h5 "
        "(whole images, for the global CNN baseline) and manifest.json. Also: python -m data_prep."))
    p.add_argument("source", metavar="FORMAT", choices=sources.SOURCES,
                   help=f"input format: {', '.join(sources.SOURCES)}")
    p.add_argument("input", metavar="INPUT", help="IDX folder, CIFAR pickle folder, image folder or .npz file")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist unless --force)")
    p.add_argument("--grid", required=True, help="subdomains per axis: NYxNX (2D) or NZxNYxNX (3D)")
    p.add_argument("--overlap", type=int, default=0, help="overlap in pixels on interior sides (default 0)")
    p.add_argument("--margin", type=int, default=0,
                   help="extra pixels stored around every subimage, for shift augmentation (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="stratified validation share of the training split (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="test share when the source has a single split (default 0.2)")
    p.add_argument("--size", type=int, nargs="+", metavar="N",
                   help="imagefolder: resize to H W (default: size of the first image)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="imagefolder: 1 (grey) or 3 (RGB)")
    p.add_argument("--volume", action="store_true", help="npz: x holds 3D volumes (n, D, H, W[, C])")
    p.add_argument("--num-classes", type=int, help="npz: number of classes (default: max label + 1)")
    p.add_argument("--max-train", type=int, help="keep a seeded random subset of this many training images")
    p.add_argument("--max-test", type=int, help="keep a seeded random subset of this many test images")
    p.add_argument("--name", help="dataset name recorded in the manifest (default: from INPUT)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and subsets (default 0)")
    p.add_argument("--no-full", action="store_true", help="do not write full.h5 (no global CNN baseline)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def load_source(args) -> sources.Source:
    if not os.path.exists(args.input):
        raise UserError(f"INPUT {args.input}: no such file or directory")
    if args.source == "idx":
        return sources.load_idx(args.input, args.name)
    if args.source in ("cifar10", "cifar100"):
        return sources.load_cifar(args.input, args.name, hundred=args.source == "cifar100")
    if args.source == "imagefolder":
        size = None
        if args.size is not None:
            if len(args.size) == 1:
                args.size = args.size * 2
            if len(args.size) != 2 or min(args.size) < 1:
                raise UserError(f"--size {' '.join(map(str, args.size))}: expected H W, two positive numbers")
            size = tuple(args.size)
        return sources.load_imagefolder(args.input, args.name, size, args.channels, args.test_fraction, args.seed)
    if args.num_classes is not None and args.num_classes < 2:
        raise UserError(f"--num-classes {args.num_classes}: expected at least 2")
    return sources.load_npz(args.input, args.name, True if args.volume else None, args.num_classes,
                            args.test_fraction, args.seed)


def subset(split: sources.Split, n: int | None, seed: int, option: str) -> sources.Split:
    if n is None or n >= len(split.y):
        return split
    if n < 1:
        raise UserError(f"{option} {n}: expected a positive number of images")
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).permutation(len(split.y))[:n])
    return sources.Split(split.x[keep], split.y[keep], split.ids[keep])


def summary(manifest: dict, out: str, seconds: float) -> str:
    lines = [f"{manifest['dataset']}: {len(manifest['classes'])} classes, image "
             f"{'x'.join(map(str, manifest['image_shape']))} ({manifest['dtype']}), "
             + ", ".join(f"{k} {v}" for k, v in manifest["splits"].items()),
             f"grid {'x'.join(map(str, manifest['grid']))}, overlap {manifest['overlap']}, "
             f"margin {manifest['margin']}, prep id {manifest['prep_id']}, written in {seconds:.1f} s to {out}",
             f"{'shard':<12} {'box (start:stop per axis)':<28} {'subimage':<12} {'MB':>8}"]
    for i, (name, box) in enumerate(zip(manifest["shards"], manifest["boxes"])):
        shape = "x".join(map(str, manifest["subimage_shapes"][i]))
        mb = os.path.getsize(os.path.join(out, name)) / 1e6
        lines.append(f"{name:<12} {' '.join(f'{a}:{b}' for a, b in box):<28} {shape:<12} {mb:8.2f}")
    if manifest.get("full"):
        mb = os.path.getsize(os.path.join(out, manifest["full"])) / 1e6
        lines.append(f"{manifest['full']:<12} {'whole image':<28} {'':<12} {mb:8.2f}")
    return "\n".join(lines)


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    grid = parse_grid(args.grid)
    check_output(args.out, args.force, [args.input])
    start = time.perf_counter()
    source = load_source(args)
    source.train = subset(source.train, args.max_train, args.seed, "--max-train")
    if source.test is not None:
        source.test = subset(source.test, args.max_test, args.seed + 1, "--max-test")
    manifest = write_dataset(source, args.out, grid, args.overlap, args.margin, args.val_fraction, args.seed,
                             force=args.force, full=not args.no_full, progress=None if not args.quiet else False)
    if not args.quiet:
        print(summary(manifest, args.out, time.perf_counter() - start), flush=True)
    return manifest


class Terminated(BaseException):
    """SIGTERM (scancel, a killed job): unwinds like Ctrl-C so the partial output is removed."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        run(argv)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("data_prep: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("data_prep: stopped by SIGTERM; nothing was written", file=sys.stderr)
        return 143
    return 0
