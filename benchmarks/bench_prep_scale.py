"""data_prep on a large image folder: time, peak memory and shard sizes for 1, 2 and 4 workers.

    python benchmarks/bench_prep_scale.py [--n 200000] [--size 112] [--workers 1,2,4] [--format png]

The folder is made from real images: every Fashion-MNIST image (70,000) upsampled to 112x112 and
saved as a PNG, then again mirrored and shifted by 5 pixels until ``--n`` files exist (10 class
folders, as torchvision's ImageFolder). Each conversion (4x4 grid, overlap 2, grey, content-ordered
split draw: two decoding passes) runs as its own process; peak memory is the largest proportional
set size (PSS: shared pages counted once) of the converter and its decoding workers together,
sampled every 0.1 s. A second, four times
smaller folder shows that peak memory does not grow with the number of images.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import FASHION, ROOT  # noqa: E402


def _write(task):
    from PIL import Image

    folder, size, fmt, items = task
    for name, label, pixels, variant in items:
        im = Image.fromarray(pixels)
        if variant % 3 == 1:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        elif variant % 3 == 2:
            im = im.transform(im.size, Image.AFFINE, (1, 0, 5, 0, 1, 5))
        im = im.resize((size, size), Image.BILINEAR)
        im.save(os.path.join(folder, f"class_{label}", f"{name}.{fmt}"), **({"quality": 90} if fmt == "jpg" else {}))


def make_folder(folder: str, n: int, size: int, fmt: str) -> None:
    from data_prep.sources import read_idx

    import numpy as np

    images = np.concatenate([read_idx(f"{FASHION}/{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")])
    labels = np.concatenate([read_idx(f"{FASHION}/{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")])
    for k in range(10):
        os.makedirs(os.path.join(folder, f"class_{k}"), exist_ok=True)
    items = [(f"{j:07d}", int(labels[j % len(labels)]), images[j % len(images)], j // len(images)) for j in range(n)]
    step = 2000
    tasks = [(folder, size, fmt, items[a:a + step]) for a in range(0, n, step)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_write, tasks)


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes of a process and all its descendants: the proportional set size counts a
    page shared between processes once in all (what the conversion really holds); the resident set
    size counts it in every process that maps it (what `ps`, `top` and most batch systems show)."""
    pss, rss, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split()[:2] for line in f if line.split()[0] in ("Pss:", "Rss:"))
            pss += int(fields["Pss:"]) * 1024
            rss += int(fields["Rss:"]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, KeyError, ValueError):
            continue
    return pss, rss


def convert(src: str, out: str, workers: int, decoder: str) -> tuple[float, int, int, int]:
    """(seconds, peak PSS and peak RSS of the process tree, bytes written)."""
    cmd = [sys.executable, "-m", "data_prep", "imagefolder", src, out, "--grid", "4x4", "--overlap", "2",
           "--channels", "1", "--workers", str(workers), "--decoder", decoder, "--quiet"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    peak = peak_rss = 0
    while proc.poll() is None:
        pss, rss = tree_memory(proc.pid)
        peak, peak_rss = max(peak, pss), max(peak_rss, rss)
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"data_prep failed: {proc.stderr.read()[-3000:]}")
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    return seconds, peak, peak_rss, written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200000)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    p.add_argument("--decoder", choices=("torchvision", "pil"), default="torchvision")
    p.add_argument("--workdir", help="keep the generated folders here (default: a temporary directory)")
    args = p.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="hpcdd-bench-scale-")
    try:
        rows = []
        for n in (args.n, args.n // 4):
            src = os.path.join(work, f"fm{args.size}_{n}_{args.format}")
            if not os.path.isdir(src):
                t0 = time.perf_counter()
                make_folder(src, n, args.size, args.format)
                print(f"made {n} {args.format} files of {args.size}x{args.size} in {time.perf_counter() - t0:.0f} s "
                      f"({sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs) / 1e9:.2f} GB)",
                      flush=True)
            for w in ([int(v) for v in args.workers.split(",")] if n == args.n else [1]):
                out = os.path.join(work, "out")
                seconds, peak, peak_rss, written = convert(src, out, w, args.decoder)
                shutil.rmtree(out)
                rows.append((n, w, seconds, peak, peak_rss, written))
                print(f"{n:>8} files  {w} worker(s): {seconds:7.1f} s  {n / seconds:7.0f} images/s  peak memory "
                      f"{peak / 1e6:6.0f} MB PSS, {peak_rss / 1e6:6.0f} MB RSS  shards {written / 1e9:6.2f} GB", flush=True)
        print(f"\ncores here: {os.cpu_count()}; grid 4x4 overlap 2, grey {args.size}x{args.size}, content-ordered "
              f"split (every image decoded twice), decoder {args.decoder}")
        print("| files | workers | seconds | speedup | peak memory (PSS, MB) | peak memory (RSS, MB) | shards (GB) |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
        base = rows[0][2]
        for n, w, seconds, peak, peak_rss, written in rows:
            speedup = f"{base / seconds:.2f}x" if n == args.n else "-"
            print(f"| {n} | {w} | {seconds:.1f} | {speedup} | {peak / 1e6:.0f} | {peak_rss / 1e6:.0f} | {written / 1e9:.2f} |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
