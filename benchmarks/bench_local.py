"""Local-phase training throughput against a bare PyTorch loop, side by side in one run.

    python benchmarks/bench_local.py [--grid 2x2] [--train 20000] [--threads 1] [--repeats 3] [--volume]

Both train the same local CNN (same initial weights, optimizer, batch size) on the same subimages
held in memory with the same threads; hpcdd's number is the training time that ``hpcdd.training.fit``
records per epoch (validation excluded, as in the bare loop). Target (issue #3): ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import median, prepared  # noqa: E402


def bare_epoch(model, x, y, batch_size: int, lr: float, weight_decay: float, seed: int) -> float:
    """The loop a PyTorch user writes: tensors in memory, randperm, forward, backward, step; model and
    images in channels_last and torch's fused Adam kernel (the faster choices here, as hpcdd's defaults)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(len(y), generator=g)
    for a in range(0, len(y), batch_size):
        idx = perm[a:a + batch_size]
        if len(idx) < 2:
            continue
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()  # a GPU runs behind the Python loop: the epoch ends when its kernels do
    return time.perf_counter() - t0


def adrenal(grid: str) -> str:
    """AdrenalMNIST3D 28^3 (the volumes shipped in tests/data) prepared on a 3D grid."""
    import tempfile

    from data_prep.cli import run

    out = os.path.join(tempfile.mkdtemp(prefix="hpcdd-bench-"), f"adrenal_{grid}")
    run(["npz", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                             "adrenalmnist3d_28.npz"), out, "--volume", "--grid", grid, "--quiet"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="2x2")
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--subdomain", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--volume", action="store_true",
                   help="3D: AdrenalMNIST3D 28^3 (tests/data) on --grid 2x2x2, channels_last_3d on both sides")
    args = p.parse_args()

    import torch

    from hpcdd.config import ModelConfig, PerformanceConfig, TrainConfig
    from hpcdd.data import ShardReader, SplitData
    from hpcdd.manifest import load_manifest
    from hpcdd.models import build_model, default_width_scale
    from hpcdd.training.acceleration import accelerate, configure, memory_format
    from hpcdd.training.fit import Fit, fit
    from hpcdd.training.rng import stream_of

    torch.set_num_threads(args.threads)
    configure(PerformanceConfig())  # process-wide (subnormals flushed): the same for both loops
    device = torch.device(args.device)
    data = adrenal(args.grid if args.grid.count("x") == 2 else "2x2x2") if args.volume else prepared(args.grid, 1, args.train)
    m = load_manifest(data)
    i = args.subdomain
    train = SplitData.load(ShardReader(m, i), "train").to_device(device)  # as hpcdd.run (data_on_device)
    val = SplitData.load(ShardReader(m, i), "val").to_device(device)
    n_sub = m.n
    t = TrainConfig(epochs=1, batch_size=128, lr=1e-3)

    dims, k = len(train.x.shape) - 2, m.k
    fmt = memory_format(dims)

    def fresh(fast: bool):
        torch.manual_seed(0)
        model = build_model(ModelConfig(), 1, train.x.shape[2:], k, default_width_scale(n_sub)).to(device)
        if fast:  # hpcdd's defaults (performance.channels_last, performance.compile)
            return accelerate(model, dims, PerformanceConfig(), device)
        return model.to(memory_format=fmt)

    x, y = train.x.to(device).contiguous(memory_format=fmt), train.y.to(device)
    hpcdd_rates, bare_rates = [], []
    fresh(False)(x[:2])  # warm-up of the kernels
    for r in range(args.repeats):
        res, = fit(fresh(True), Fit(name=f"local subdomain {i}", train=train, val=val, t=t, stream=stream_of(r, "local", i),
                               device=device))
        hpcdd_rates.append(res.images / res.seconds)
        seconds = bare_epoch(fresh(False), x, y, t.batch_size, t.lr, t.weight_decay, r)
        bare_rates.append(len(y) / seconds)
        print(f"repeat {r}: hpcdd {hpcdd_rates[-1]:8.0f} img/s   bare PyTorch {bare_rates[-1]:8.0f} img/s")
    ratio = median(hpcdd_rates) / median(bare_rates)
    print(f"local CNN on {'x'.join(map(str, train.x.shape[1:]))} subimages ({len(y)} per epoch), "
          f"{args.threads} thread(s), {device}: hpcdd {median(hpcdd_rates):.0f} img/s, bare {median(bare_rates):.0f} img/s")
    print(f"throughput ratio hpcdd / bare = {ratio:.3f} (target >= 0.95: {'PASS' if ratio >= 0.95 else 'FAIL'})")


if __name__ == "__main__":
    main()
