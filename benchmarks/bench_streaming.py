"""Streamed training against in-memory training, side by side in one run; and a shard's cold read rate.

    python benchmarks/bench_streaming.py [--grid 2x2] [--subdomain 0] [--threads 1] [--repeats 3]

Both sides train the same local CNN one epoch with ``hpcdd.training.fit`` on the same subdomain of all
54,000 Fashion-MNIST training images, in the same (chunk-aware) order: once from tensors in memory,
once streamed from the shard (``memory_limit`` forced below the split's size; blocks of 1024 rows read
and normalised a window ahead by the read-ahead thread). Target (issue #12): streamed / in-memory
throughput >= 0.9. Then the shard's training split is read from a cold page cache (its pages dropped
with posix_fadvise) and that rate is printed next to the rate training consumes the same bytes.
Last, the cost of the shards' checksums (issue #26): read rate and streamed training throughput of the
shard as written (fletcher32) against a copy of the same chunks without it (target: within 2 %).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import median, prepared  # noqa: E402


def cold_read(path: str, split: str, block: int) -> tuple[float, int]:
    """(seconds, bytes) to read ``split``/x of a shard in blocks after dropping its cached pages."""
    import h5py

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        ds = f[split]["x"]
        for a in range(0, ds.shape[0], block):
            ds[a:a + block]
        nbytes = ds.size * ds.dtype.itemsize
    return time.perf_counter() - t0, nbytes


def without_checksums(data: str, i: int) -> str:
    """A copy of a preparation whose shard ``i`` stores the same chunks without fletcher32: the baseline
    of the checksum's cost (hpcdd writes every dataset with it)."""
    import shutil

    import h5py

    out = data + "-plain"
    if not os.path.exists(out):
        shutil.copytree(data, out)
        path = os.path.join(out, f"sub_{i:03d}.h5")
        with h5py.File(os.path.join(data, f"sub_{i:03d}.h5"), "r") as src, h5py.File(path + ".new", "w",
                                                                                       libver="latest") as dst:
            dst.attrs.update(src.attrs)
            for split in src:
                g = dst.create_group(split)
                g.attrs.update(src[split].attrs)
                for key in src[split]:
                    ds = src[split][key]
                    g.create_dataset(key, data=ds[:], chunks=ds.chunks if key == "x" else None)
        os.replace(path + ".new", path)
    return out


def checksum_cost(data: str, i: int, args, t, fresh) -> None:
    """Read rate and streamed training throughput of shard ``i`` with and without HDF5's checksums,
    alternating, medians of ``--repeats`` (target: within 2 %)."""
    import torch

    from hpcdd.data import STREAM_BLOCK, ShardReader, SplitData, StreamPlan
    from hpcdd.manifest import load_manifest
    from hpcdd.training.fit import Fit, fit
    from hpcdd.training.rng import stream_of

    plain = without_checksums(data, i)
    plan = StreamPlan(STREAM_BLOCK, args.window)
    rates = {"checksummed": [], "plain": []}
    reads = {"checksummed": [], "plain": []}
    for r in range(args.repeats):
        for name, folder in (("checksummed", data), ("plain", plain)):
            m = load_manifest(folder)
            sample = int(torch.tensor(m.stored_shape(i)).prod()) * 4
            train = SplitData.load(ShardReader(m, i), "train", memory_limit=sample * args.window * 4, plan=plan)
            val = SplitData.load(ShardReader(m, i), "val")
            res, = fit(fresh(), Fit(name=f"local subdomain {i}", train=train, val=val, t=t,
                                   stream=stream_of(r, "local", i), device=torch.device("cpu")))
            train.close()
            rates[name].append(res.images / res.seconds)
            seconds, nbytes = cold_read(m.shard_path(i), "train", STREAM_BLOCK)
            reads[name].append(nbytes / seconds / 1e6)
    train_ratio = median(rates["checksummed"]) / median(rates["plain"])
    read_ratio = median(reads["checksummed"]) / median(reads["plain"])
    print(f"checksums (fletcher32): cold read {median(reads['checksummed']):.0f} vs {median(reads['plain']):.0f} MB/s "
          f"without ({read_ratio:.3f}); streamed training {median(rates['checksummed']):.0f} vs "
          f"{median(rates['plain']):.0f} img/s = {train_ratio:.3f} (target >= 0.98: "
          f"{'PASS' if train_ratio >= 0.98 else 'FAIL'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="2x2")
    p.add_argument("--subdomain", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=8192, help="rows shuffled together when streaming")
    args = p.parse_args()

    import torch

    from hpcdd.config import ModelConfig, TrainConfig
    from hpcdd.data import STREAM_BLOCK, ShardReader, SplitData, StreamPlan
    from hpcdd.manifest import load_manifest
    from hpcdd.models import build_model, default_width_scale
    from hpcdd.training.fit import Fit, fit
    from hpcdd.training.rng import stream_of

    torch.set_num_threads(args.threads)
    data = prepared(args.grid, 1, None)
    m = load_manifest(data)
    i = args.subdomain
    plan = StreamPlan(STREAM_BLOCK, args.window)
    sample = int(torch.tensor(m.stored_shape(i)).prod()) * 4
    in_memory = SplitData.load(ShardReader(m, i), "train", plan=plan)
    streamed = SplitData.load(ShardReader(m, i), "train", memory_limit=sample * args.window * 4, plan=plan)
    val = SplitData.load(ShardReader(m, i), "val")
    assert in_memory.in_memory and not streamed.in_memory
    t = TrainConfig(epochs=1, batch_size=128, lr=1e-3)

    def fresh():
        torch.manual_seed(0)
        return build_model(ModelConfig(), 1, m.subimage_shape(i), 10, default_width_scale(m.n))

    rates = {"memory": [], "streamed": []}
    for r in range(args.repeats):
        for name, split in (("memory", in_memory), ("streamed", streamed)):
            res, = fit(fresh(), Fit(name=f"local subdomain {i}", train=split, val=val, t=t,
                                   stream=stream_of(r, "local", i), device=torch.device("cpu")))
            rates[name].append(res.images / res.seconds)
        print(f"repeat {r}: in memory {rates['memory'][-1]:7.0f} img/s   streamed {rates['streamed'][-1]:7.0f} img/s")
    ratio = median(rates["streamed"]) / median(rates["memory"])
    print(f"local CNN, subdomain {i} of {args.grid} ({len(in_memory)} subimages of "
          f"{'x'.join(map(str, m.stored_shape(i)))}), {args.threads} thread(s); window {args.window} rows, "
          f"memory_limit {sample * args.window * 4 / 1e6:.0f} MB")
    print(f"throughput streamed / in memory = {ratio:.3f} (target >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})")
    streamed.close()

    seconds, nbytes = cold_read(m.shard_path(i), "train", STREAM_BLOCK)
    read_rate = nbytes / seconds / 1e6
    consume = median(rates["streamed"]) * nbytes / len(in_memory) / 1e6
    print(f"cold read of {os.path.basename(m.shard_path(i))} train ({nbytes / 1e6:.1f} MB): {read_rate:.0f} MB/s; "
          f"training consumes {consume:.2f} MB/s: reading is {read_rate / consume:.0f}x faster than training needs")
    checksum_cost(data, i, args, t, fresh)


if __name__ == "__main__":
    main()
