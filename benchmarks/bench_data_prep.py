"""data_prep speed on all 70,000 Fashion-MNIST images (4x4 grid, overlap 2), and shard read speed.

    python benchmarks/bench_data_prep.py

Targets (issue #2): preparation at most 15 s on the 2-core machine; reading a shard's training split
must not limit training, so its speed is printed next to the rate at which local training
consumes the same bytes (measured here too, one epoch of the local CNN on that shard).
Then (issue #12) the two image decoders of ``imagefolder`` side by side on the same files, one
process: torchvision.io.decode_image (+ antialiased resize) against PIL, PNG and JPEG, 112x112 grey
Fashion-MNIST images, as stored and resized to 64x64.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import FASHION  # noqa: E402


def main() -> None:
    import torch  # noqa: F401  (imported before timing the loads)

    from data_prep.cli import run
    from hpcdd.data import ShardReader, SplitData
    from hpcdd.manifest import load_manifest

    work = tempfile.mkdtemp(prefix="hpcdd-bench-prep-")
    try:
        out = os.path.join(work, "fm44")
        t0 = time.perf_counter()
        run(["idx", FASHION, out, "--grid", "4x4", "--overlap", "2", "--name", "fashion-mnist", "--quiet"])
        prep = time.perf_counter() - t0
        m = load_manifest(out)
        total = sum(m.splits.values())
        print(f"data_prep: {total} images -> 16 shards + full.h5 in {prep:.2f} s "
              f"(target <= 15 s: {'PASS' if prep <= 15 else 'FAIL'})")
        i = 5  # an interior subdomain: the largest subimage (with overlap on every side)
        reader = ShardReader(m, i)
        nbytes = reader.nbytes("train")
        times = []
        for _ in range(3):
            reader.close()
            t0 = time.perf_counter()
            reader.read("train")
            times.append(time.perf_counter() - t0)
        raw = nbytes / min(times) / 1e6
        reader.close()
        t0 = time.perf_counter()
        split = SplitData.load(ShardReader(m, i), "train")
        load = time.perf_counter() - t0
        print(f"read sub_{i:03d}.h5 train ({nbytes / 1e6:.1f} MB raw, {m.count('train')} subimages): "
              f"{raw:.0f} MB/s raw HDF5; {nbytes / load / 1e6:.0f} MB/s into normalised float32 tensors ({load:.2f} s)")
        from hpcdd.config import TrainConfig
        from hpcdd.config import ModelConfig
        from hpcdd.models import build_model
        from hpcdd.training.fit import Fit, fit
        from hpcdd.training.rng import stream_of

        torch.set_num_threads(1)
        model = build_model(ModelConfig(), 1, split.x.shape[2:], 10, 0.25)
        res, = fit(model, Fit(name=f"local subdomain {i}", train=split, val=SplitData.load(ShardReader(m, i), "val"),
                             t=TrainConfig(epochs=1), stream=stream_of(0, "local", i), device=torch.device("cpu")))
        consume = res.history[0]["images_per_s"] * nbytes / m.count("train") / 1e6
        print(f"local training (1 thread) consumes {res.history[0]['images_per_s']:.0f} subimages/s = {consume:.2f} MB/s; "
              f"reading is {raw / consume:.0f}x faster than training needs, and happens once per run")
        decoders(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def decoders(work: str, n: int = 2000) -> None:
    from PIL import Image

    from data_prep.sources import decode_image_file as decode_file, read_idx

    import numpy as np

    x = read_idx(f"{FASHION}/t10k-images-idx3-ubyte.gz")[:n]
    cases = [("png", "112x112 grey", (112, 112), 1, [None, (64, 64)]),
             ("jpg", "112x112 grey", (112, 112), 1, [None, (64, 64)]),
             ("jpg", "500x375 RGB (ImageNet-like)", (500, 375), 3, [(224, 224)])]
    for ext, label, wh, channels, sizes in cases:
        files = []
        for j, a in enumerate(x[: n if channels == 1 else n // 4]):
            files.append(os.path.join(work, f"{j}_{wh[0]}.{ext}"))
            im = Image.fromarray(a if channels == 1 else np.stack([a, np.roll(a, 3, 0), 255 - a], -1))
            im.resize(wh, Image.BICUBIC).save(files[-1], **({"quality": 90} if ext == "jpg" else {}))
        for size in sizes:
            rates = {}
            for library in ("torchvision", "pil", "torchvision", "pil"):  # each twice: the second run counts
                t0 = time.perf_counter()
                for f in files:
                    decode_file(f, size, channels, library)
                rates[library] = len(files) / (time.perf_counter() - t0)
            print(f"decode {ext} {label} -> {'as stored' if size is None else 'x'.join(map(str, size))}: torchvision "
                  f"{rates['torchvision']:.0f} img/s, PIL {rates['pil']:.0f} img/s, "
                  f"ratio {rates['torchvision'] / rates['pil']:.2f}")


if __name__ == "__main__":
    main()
