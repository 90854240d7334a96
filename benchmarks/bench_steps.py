"""GFLOP/s of one training step, 2D and 3D side by side in one run, each in the plain and the
channels-last memory format (what hpcdd's ``performance.channels_last`` picks: channels_last for 2D,
channels_last_3d for 3D).

    python benchmarks/bench_steps.py [--threads 1] [--repeats 5]

A step: forward, cross-entropy, backward, fused Adam, one thread, subnormals flushed (hpcdd's
settings); FLOPs counted as results.json counts them (torch's FlopCounterMode, forward + backward).
Target (issue #24): a 3D local CNN's and the global 3D CNN's step each reach at least half the
GFLOP/s of the 2D step of similar work.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

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
