"""GFLOP/s of one training step, 2D and 3D side by side in one run, each in the plain and the
channels-last memory format (what hpcdd's ``performance.channels_last`` picks: channels_last for 2D,
channels_last_3d for 3D).

    python benchmarks/bench_steps.py [--threads 1] [--repeats 5]
    python benchmarks/bench_steps.py --local-phase [--epochs 2] [--train 10000]

A step: forward, cross-entropy, backward, fused Adam, one thread, subnormals flushed (hpcdd's
settings); FLOPs counted as results.json counts them (torch's FlopCounterMode, forward + backward).
Target (issue #24): a 3D local CNN's and the global 3D CNN's step each reach at least half the
GFLOP/s of the 2D step of similar work.

``--local-phase``, end to end: ``hpcdd.run --phases local`` on one rank and one thread, the default
VGG, on AdrenalMNIST3D 28^3 (tests/data, 2x2x2) and on Fashion-MNIST 2x2 (--train images); GFLOP/s =
training FLOPs of one epoch (every local CNN's, counted as results.json counts them) x epochs / the
local phase's wall time. Target (issue #24): 3D >= 0.5 of 2D.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, spatial shape, width scale (local: 1/sqrt(N)), batch, widths, the 2D case of similar work)
CASES = (
    ("2D local 15x15 (28x28, 2x2, overlap 1)", (15, 15), 0.5, 128, (32, 64, 128), None),
    ("2D local 9x9 (28x28, 4x4, overlap 2)", (9, 9), 0.25, 128, (32, 64, 128), None),
    ("2D global 28x28", (28, 28), 1.0, 32, (32, 64, 128), None),
    ("3D local 14^3 (28^3, 2x2x2)", (14, 14, 14), 8 ** -0.5, 128, (32, 64, 128), "2D local 15x15 (28x28, 2x2, overlap 1)"),
    ("3D local 16^3 (32^3, 2x2x2), widths 8-16-32", (16, 16, 16), 8 ** -0.5, 128, (8, 16, 32),
     "2D local 9x9 (28x28, 4x4, overlap 2)"),
    ("3D local 32x16x16 (64^3, 4x4x2)", (32, 16, 16), 32 ** -0.5, 32, (32, 64, 128), "2D local 9x9 (28x28, 4x4, overlap 2)"),
    ("3D global 28^3", (28, 28, 28), 1.0, 32, (32, 64, 128), "2D global 28x28"),
)


def step_seconds(model, x, y, repeats: int) -> float:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), 1e-3, fused=True)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:  # the first steps allocate and pick kernels
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def local_phase_rate(data: str, epochs: int) -> tuple[float, float]:
    """(GFLOP/s, wall seconds) of hpcdd's local phase on ``data``: one rank, one thread."""
    import tempfile

    from benchmarks.common import launch
    from hpcdd import atomic
    from hpcdd.config import ModelConfig, DNNConfig
    from hpcdd.factory import Models
    from hpcdd.manifest import load_manifest
    from hpcdd.progress import training_flops

    out = os.path.join(tempfile.mkdtemp(prefix="hpcdd-bench-"), "run")
    launch(["-m", "hpcdd.run", "--data", data, "--out", out, "--phases", "local", "--epochs", str(epochs),
            "--threads", "1"])
    m = load_manifest(data)
    models = Models(ModelConfig(), DNNConfig(), m, 0)
    flops = sum(training_flops(models.local(i), (m.channels,) + m.subimage_shape(i)) for i in range(m.n))
    wall = atomic.read_json(os.path.join(out, "local", "result.json"))["wall_seconds"]
    return flops * m.count("train") * epochs / wall / 1e9, wall


def end_to_end(epochs: int, train: int) -> None:
    from benchmarks.bench_local import adrenal
    from benchmarks.common import prepared

    rates = {}
    for name, data in (("Fashion-MNIST 28x28, 2x2", prepared("2x2", 1, train)),
                       ("AdrenalMNIST3D 28^3, 2x2x2", adrenal("2x2x2"))):
        rates[name], wall = local_phase_rate(data, epochs)
        print(f"local phase, {name:28s}: {rates[name]:6.1f} GFLOP/s ({wall:.1f} s, {epochs} epoch(s), 1 rank, 1 thread)",
              flush=True)
    ratio = rates["AdrenalMNIST3D 28^3, 2x2x2"] / rates["Fashion-MNIST 28x28, 2x2"]
    print(f"3D / 2D local phase GFLOP/s = {ratio:.2f} (target >= 0.5: {'PASS' if ratio >= 0.5 else 'FAIL'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--local-phase", action="store_true", help="end to end: hpcdd's local phase, 3D against 2D")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train", type=int, default=10000, help="Fashion-MNIST training images (--local-phase)")
    args = p.parse_args()
    if args.local_phase:
        end_to_end(args.epochs, args.train)
        return

    import torch

    from hpcdd.config import ModelConfig
    from hpcdd.models import build_model
    from hpcdd.progress import training_flops
    from hpcdd.training.acceleration import memory_format

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rate = {}
    print(f"{'case':48s} {'batch':>5s} {'MFLOP/img':>9s} {'plain GFLOP/s':>14s} {'channels-last':>14s} {'3D / 2D':>8s}")
    for name, shape, scale, batch, widths, like in CASES:
        spec = ModelConfig(widths=list(widths))
        x, y = torch.randn(batch, 1, *shape), torch.randint(0, 10, (batch,))
        torch.manual_seed(0)
        flops = training_flops(build_model(spec, 1, shape, 10, scale), (1,) + shape) * batch
        got = []
        for fmt in (None, memory_format(len(shape))):
            torch.manual_seed(0)
            model = build_model(spec, 1, shape, 10, scale)
            xx = x
            if fmt is not None:
                model, xx = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            got.append(flops / step_seconds(model, xx, y, args.repeats) / 1e9)
        rate[name] = got[1]
        ratio = f"{got[1] / rate[like]:.2f}" if like else ""
        print(f"{name:48s} {batch:5d} {flops / batch / 1e6:9.1f} {got[0]:14.1f} {got[1]:14.1f} {ratio:>8s}", flush=True)
    worst = min(rate[n] / rate[like] for n, *_, like in CASES if like)
    print(f"3D step GFLOP/s / 2D step of similar work, channels-last (hpcdd's default): worst {worst:.2f} "
          f"(target >= 0.5: {'PASS' if worst >= 0.5 else 'FAIL'})")


if __name__ == "__main__":
    main()
