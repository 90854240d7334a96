"""``python -m data_prep SOURCE INPUT OUT --grid 4x4 ...``: prepare HDF5 shards for hpcdd."""

from __future__ import annotations

import os
import sys
import time

from hpcdd.cli_util import OneLineParser, count
from hpcdd.decomposition import parse_grid
from hpcdd.errors import AgreedError, UserError, fail

import numpy as np

from . import sources
from .ranks import Ranks, init_ranks
from .writer import (CHUNK_BYTES, COMPLETE, DiskFull, Progress, Terminated, check_output, check_terminated, chunk_rows, chunks, terminate,
                     wait_for_discard, write_dataset)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="hpcdd-prep", description=(
        "Convert a dataset into HDF5 shards, one per subdomain of the decomposition, plus full.h5 "
        "(whole images, for the global CNN baseline) and manifest.json. Also: python -m data_prep. "
        "`hpcdd-prep reseal DATA` seals a manifest.json edited on purpose."))
    p.add_argument("source", metavar="FORMAT", choices=sources.SOURCES,
                   help=f"input format: {', '.join(sources.SOURCES)}")
    p.add_argument("input", metavar="INPUT",
                   help="IDX folder, CIFAR pickle folder, image folder, NIfTI folder (one sub-folder of .nii/.nii.gz "
                        "volumes per class) or .npz file")
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
                   help="imagefolder: resize to H W (default: size of the first image); nifti: resample every "
                        "volume to D H W (trilinear; required)")
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="nifti: clip intensities to LOW..HIGH in the files' units (e.g. -1000 400 HU), then scale "
                        "to 0..1 (default: stored values as float32)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="imagefolder: 1 (grey) or 3 (RGB)")
    p.add_argument("--volume", action="store_true", help="npz: x holds 3D volumes (n, D, H, W[, C])")
    p.add_argument("--num-classes", type=int, help="npz: number of classes (default: max label + 1)")
    p.add_argument("--max-train", type=int, help="keep a seeded random subset of this many training images")
    p.add_argument("--max-test", type=int, help="keep a seeded random subset of this many test images")
    p.add_argument("--name", help="dataset name recorded in the manifest (default: from INPUT)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and subsets (default 0)")
    p.add_argument("--no-full", action="store_true", help="do not write full.h5 (no global CNN baseline)")
    p.add_argument("--split-draw", choices=("content", "position"), default="content",
                   help="order of the seeded test/validation/subset draws: content (default; a hash of each image's "
                        "pixels, so the split is the same from any source format or file order; costs one extra "
                        "decoding pass for image folders) or position (source order; the draws made before "
                        "content ids, with byte-identical shards)")
    p.add_argument("--skip-bad", action="store_true",
                   help="imagefolder: skip files that cannot be decoded (listed in the manifest) instead of stopping")
    p.add_argument("--workers", type=count(1), metavar="N",
                   help="imagefolder: decoding processes per rank (default: the cores of this rank)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="imagefolder: allow more --workers than this process's cores (still capped by free memory)")
    p.add_argument("--decoder", choices=("torchvision", "pil"), default="torchvision",
                   help="imagefolder: torchvision.io (default; JPEG, PNG, WebP, GIF; PIL for the rest) or PIL for "
                        "every file (no torch in the decoding processes: less memory per worker)")
    p.add_argument("--chunk-mb", type=float, default=CHUNK_BYTES / 2**20, metavar="MB",
                   help="pixels decoded and written at a time, per chunk (default 128); the output does not depend on it")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="under srun/mpiexec: longest wait for another rank's part, in seconds (default 600)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def chunk_bytes(args) -> int:
    return max(1, int(args.chunk_mb * 2**20))


def default_workers() -> int:
    """The cores of this process, shared with the other tasks a launcher put on this node."""
    from hpcdd.parallel.launcher import world_info

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, world_info(os.environ).local_size or 1))


DISCARD_WAIT = 5.0  # seconds a stopped rank waits for rank 0 to remove the partial output
# resident memory of one decoding process, measured on 112x112 PNGs (fork, as spawn): torchvision imports
# torch (672 MB RSS, 516 MB PSS), PIL does not (28 MB); plus its share of a chunk of pixels
WORKER_MB = {"torchvision": 700, "pil": 60, "nifti": 700}  # nifti: nibabel and torch (resampling)


def available_mb() -> float | None:
    """Memory this process can still take: MemAvailable, or less under a cgroup limit (a SLURM job's)."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            room = (int(limit) - used) / 2**20
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


def safe_workers(args, ranks: Ranks | None, library: str) -> int:
    """--workers, capped at the cores this process may use (unless --oversubscribe) and at what the free
    memory holds: 64 decoding processes on a 2-core node once took 21 GB and another job with them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = args.workers or default_workers()
    notes = []
    if workers > cores and not args.oversubscribe:
        notes.append(f"capped at {cores}, the cores this process may use (--oversubscribe keeps {workers})")
        workers = cores
    free, each = available_mb(), WORKER_MB[library] + args.chunk_mb
    if free is not None and workers * each > 0.8 * free:
        fit = int(0.8 * free // each)
        if fit < 1:
            raise UserError(f"--workers: one {library} decoding process needs about {each:.0f} MB but only "
                            f"{free:.0f} MB are free; free memory, or use --decoder pil ({WORKER_MB['pil']} MB each)")
        notes.append(f"reduced to {fit}: {workers} x ~{each:.0f} MB would not fit in the {free:.0f} MB free")
        workers = fit
    if notes and (ranks is None or ranks.is_root):
        print(f"data_prep: --workers {args.workers or default_workers()} {'; '.join(notes)}", file=sys.stderr,
              flush=True)
    return workers


def decoder_for(args, ranks: Ranks | None, library: str, window=None) -> sources.Decoder:
    """The pool that decodes a folder's files: safe worker count; spawn under MPI (a forked MPI process is
    not safe everywhere), fork otherwise; a SIGTERM seen while it waits for its workers."""
    decoder = sources.Decoder(safe_workers(args, ranks, library),
                              "spawn" if ranks is not None and ranks.size > 1 else "fork", library, window)
    decoder.stop_check = check_terminated
    return decoder


def load_source(args, ranks: Ranks | None = None) -> sources.Source:
    if not os.path.exists(args.input):
        raise UserError(f"INPUT {args.input}: no such file or directory")
    if args.source == "idx":
        return sources.load_idx(args.input, args.name)
    if args.source in ("cifar10", "cifar100"):
        return sources.load_cifar(args.input, args.name, hundred=args.source == "cifar100")
    if args.source == "nifti":
        size = tuple(args.size or ())
        if len(size) != 3 or min(size) < 1:
            raise UserError(f"--size {' '.join(map(str, size)) or '(missing)'}: the nifti source needs D H W, three "
                            f"positive numbers (every volume is resampled to it)")
        window = None
        if args.window is not None:
            low, high = args.window
            if not (np.isfinite(low) and np.isfinite(high) and low < high):
                raise UserError(f"--window {low:g} {high:g}: expected LOW < HIGH, finite, in the files' units "
                                f"(e.g. -1000 400 Hounsfield units)")
            window = (low, high)
        return sources.load_nifti(args.input, args.name, size, window, decoder_for(args, ranks, "nifti", window))
    if args.window is not None:
        raise UserError("--window applies to the nifti source only")
    if args.source == "imagefolder":
        size = None
        if args.size is not None:
            if len(args.size) == 1:
                args.size = args.size * 2
            if len(args.size) != 2 or min(args.size) < 1:
                raise UserError(f"--size {' '.join(map(str, args.size))}: expected H W, two positive numbers")
            size = tuple(args.size)
        return sources.load_imagefolder(args.input, args.name, size, args.channels,
                                        decoder_for(args, ranks, args.decoder))
    if args.num_classes is not None and args.num_classes < 2:
        raise UserError(f"--num-classes {args.num_classes}: expected at least 2")
    return sources.load_npz(args.input, args.name, True if args.volume else None, args.num_classes)


def scan(split: sources.Split, ranks: Ranks, skip_bad: bool, progress,
         chunk_bytes: int) -> tuple[sources.Split, np.ndarray, list]:
    """One pass over a split: the content id of every image (and, with --skip-bad, the files that
    cannot be decoded, dropped from the split). Finds a corrupt file before anything is written."""
    x = sources.Images.of(split.x)
    rows = chunk_rows(x.shape[1:], x.dtype.itemsize, chunk_bytes)
    ids, skipped = [], []
    for a, b in chunks(len(split.y), rows):
        check_terminated()
        if skip_bad:
            h, messages = ranks.bad(x, np.arange(a, b))
            skipped += messages
        else:
            h = ranks.hashes(x, np.arange(a, b))
        ids.append(h)
        progress.update(b - a)
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if skip_bad and (ids < 0).any():
        keep = np.flatnonzero(ids >= 0)
        split, ids = split.take(keep), ids[keep]
    return split, ids, skipped


def prepare_source(source: sources.Source, args, ranks: Ranks):
    """Content ids, bad files, the test split of single-split sources, --max-* subsets: (source,
    content ids of its training images or None, skipped files)."""
    content = args.split_draw == "content"
    order = {"train": None, "test": None}
    skipped = []
    if content or args.skip_bad:
        parts = [s for s in (source.train, source.test) if s is not None]
        bar = Progress(sum(len(s.y) for s in parts), "hashing images", None if not args.quiet and ranks.is_root
                       else False)
        source.train, order["train"], bad = scan(source.train, ranks, args.skip_bad, bar, chunk_bytes(args))
        skipped += bad
        if source.test is not None:
            source.test, order["test"], bad = scan(source.test, ranks, args.skip_bad, bar, chunk_bytes(args))
            skipped += bad
        bar.close()
        if skipped:  # positions among the files that could be read
            n = len(source.train.y)
            source.train.ids = np.arange(n, dtype=np.int64)
            if source.test is not None:
                source.test.ids = n + np.arange(len(source.test.y), dtype=np.int64)
        if not content:
            order = {"train": None, "test": None}
    if source.test is None:
        kept, held = sources.stratified_split(source.train.y, args.test_fraction, args.seed, "--test-fraction",
                                              order["train"])
        whole, o = source.train, order["train"]
        source.train, source.test = whole.take(kept), whole.take(held)
        order = {"train": None if o is None else o[kept], "test": None if o is None else o[held]}
    for name, n, seed, option in (("train", args.max_train, args.seed, "--max-train"),
                                  ("test", args.max_test, args.seed + 1, "--max-test")):
        split = getattr(source, name)
        if n is None or n >= len(split.y):
            continue
        if n < 1:
            raise UserError(f"{option} {n}: expected a positive number of images")
        keep = sources.random_subset(len(split.y), n, seed, order[name])
        setattr(source, name, split.take(keep))
        order[name] = None if order[name] is None else order[name][keep]
    return source, order["train"], skipped


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


def run(argv=None, ranks: Ranks | None = None) -> dict:
    """Parse, load, draw the splits, write; under a launcher every rank takes part (see ranks.py)."""
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout}: expected a positive number of seconds")
    if args.chunk_mb <= 0:
        raise UserError(f"--chunk-mb {args.chunk_mb}: expected a positive size in MB")
    ranks = ranks or init_ranks(args.timeout)
    grid = ranks.together(lambda: parse_grid(args.grid))
    ranks.agree(lambda: check_output(args.out, args.force, [args.input]))
    start = time.perf_counter()
    source = ranks.together(lambda: load_source(args, ranks))
    if len(source.classes) < 2:
        source.close()
        raise AgreedError(f"INPUT {args.input}: {len(source.classes)} class ({', '.join(source.classes) or 'none'}); a "
                          f"classifier needs at least 2: nothing was written")
    try:
        source, order, skipped = prepare_source(source, args, ranks)
        extra = dict(source.info, **({"skipped": skipped} if args.skip_bad else {})) or None
        manifest = write_dataset(source, args.out, grid, args.overlap, args.margin, args.val_fraction, args.seed,
                                 force=args.force, full=not args.no_full,
                                 progress=None if not args.quiet else False, ranks=ranks, order=order, extra=extra,
                                 chunk_bytes=chunk_bytes(args))
    except BaseException:
        source.close(abandon=True)
        raise
    source.close()
    if not args.quiet and ranks.is_root:
        print(summary(manifest, args.out, time.perf_counter() - start), flush=True)
        if skipped:
            print(f"skipped {len(skipped)} file(s) that could not be decoded (listed in manifest.json):", flush=True)
            for line in skipped[:10]:
                print(f"  {line}", flush=True)
    return manifest


def _quiet_stops(unraisable) -> None:
    """A stop (SIGINT, SIGTERM) that Python dropped (raised inside a weakref callback or a fork handler)
    is not printed: the flag it left stops the preparation at the next check (``check_terminated``)."""
    if isinstance(unraisable.exc_value, (Terminated, KeyboardInterrupt)):
        return
    sys.__unraisablehook__(unraisable)


def reseal(argv) -> int:
    """``hpcdd-prep reseal DATA``: seal a manifest.json that a user edited on purpose, after checking it."""
    from hpcdd.atomic import read_json, write_json
    from hpcdd.manifest import MANIFEST_NAME, SEAL, Manifest, seal

    p = OneLineParser(prog="hpcdd-prep reseal", description=(
        "Record the digest of DATA/manifest.json as it is now. Readers refuse a manifest edited after "
        "data_prep; after an edit made on purpose (a class renamed, say), this makes it the preparation's."))
    p.add_argument("data", metavar="DATA", help="directory written by data_prep")
    args = p.parse_args(argv)
    path = os.path.join(args.data, MANIFEST_NAME)
    values = read_json(path, f"missing; is {args.data} a directory written by data_prep?")
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object")
    values[SEAL] = seal(values)
    Manifest.from_dict(values, args.data, path)  # an edit must still describe valid shards
    write_json(values, path)
    print(f"{path}: sealed as it is now")
    return 0


def main(argv=None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reseal"]:
        try:
            return reseal(argv[1:])
        except UserError as e:
            fail(str(e))
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    sys.unraisablehook = _quiet_stops
    ranks = out = None
    try:
        args = build_parser().parse_args(argv)
        out = getattr(args, "out", None)
        ranks = init_ranks(args.timeout if args.timeout > 0 else 600.0)
        run(argv, ranks)
    except AgreedError as e:  # every rank knows: rank 0 says it
        fail(None if ranks is not None and not ranks.is_root else str(e))
    except UserError as e:  # this rank alone: say it and end the others
        if ranks is not None and ranks.size > 1:
            print(f"error: rank {ranks.rank}: {e}", file=sys.stderr, flush=True)
            ranks.abort(2)
        if isinstance(e, DiskFull):
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)
        fail(str(e))
    except (KeyboardInterrupt, Terminated) as e:
        code, what = (130, "interrupted") if isinstance(e, KeyboardInterrupt) else (143, "stopped by SIGTERM")
        return stopped(ranks, code, what, out)
    return 0


def stopped(ranks: Ranks | None, code: int, what: str, out: str | None) -> int:
    """A signal ended the preparation (rank 0 removes its output): rank 0 says so once. Under a
    launcher every rank got the signal; a rank leaves without MPI_Finalize, which would wait for peers
    that may have stopped in the middle of a message, once rank 0's partial output is gone (bounded).
    A second signal (mpirun forwards Ctrl-C that the rank also got from the terminal) must not
    interrupt the leaving."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    if ranks is None or ranks.is_root:
        done = out is not None and os.path.abspath(out) in COMPLETE  # the stop came after the last write
        print(f"data_prep: {what} after {out} was complete; it is kept" if done else
              f"data_prep: {what}; nothing was written", file=sys.stderr, flush=True)
    if ranks is not None and ranks.size > 1:
        if out and not ranks.is_root:
            wait_for_discard(out, DISCARD_WAIT)
        sys.stdout.flush()
        os._exit(code)
    return code
