"""What could raise the kernel-bound speedup of the 4x4 case (issue #25 item 2): each try's measured
effect on the busiest rank's local training steps, side by side with the global CNN's, in one run.

    python benchmarks/bench_kernel_tries.py [--run RUN | --data DIR] [--ranks 4] [--rounds 5]

Without ``--run``/``--data`` it prepares bench_speedup's ``fm4x4`` case (Fashion-MNIST, 4x4 grid,
overlap 1: subimages of 8x8, 8x9, 9x8 and 9x9, four per rank, VGG widths 8..32). Every step is timed
as bench_speedup's kernel-bound times it (one thread, random inputs, all models interleaved). Tries:

- ``hpcdd``: as a run trains them (subdomains of one subimage shape fused: two groups of two per rank);
- ``unfused``: every local CNN alone (what fusion gives);
- ``oneDNN off``: the same groups with ``torch.backends.mkldnn`` disabled (ATen's own convolutions,
  which can suit few channels);
- ``channels_last off``: the same groups in the NCHW format;
- ``padded, unmasked``: all of a rank's local CNNs fused as one model at the largest subimage shape
  (VGG's layers do not depend on it), the smaller subimages zero-padded: the upper bound of
  cross-shape fusion, not equivalent (the padding enters BatchNorm's statistics, the convolutions
  next to it and the head's average);
- ``padded, masked``: the same made exact (``Padding``: BatchNorm's statistics and the head's average
  over each member's own pixels, the padding zeroed after every BatchNorm; outputs equal the members'
  alone to 6e-7, checked for both subimage shapes of a rank), written with autograd's elementwise
  operations as a fused kernel would not be: what exactness costs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_speedup import Stepper, global_stepper, group_stepper, interleaved  # noqa: E402
from benchmarks.common import prepared  # noqa: E402


class Padding:
    """The valid pixels of each member of a padded fused input, at every layer's resolution (VGG's
    max pooling halves with ceil_mode, so a valid extent n becomes ceil(n / 2)), and the layers that
    respect them: BatchNorm (training) with statistics over valid pixels only, padding zeroed after
    it (so the next convolution sees the zeros its own padding would), and the head's global average
    over valid pixels only."""

    def __init__(self, members: int, valid: list, padded: tuple):
        self.members, self.valid, self.padded, self.masks = members, valid, padded, {}

    def mask(self, x):
        import torch

        key = tuple(x.shape[1:])
        if key not in self.masks:
            m = torch.zeros((1,) + key)
            per = x.shape[1] // self.members
            for g, extent in enumerate(self.valid):
                region = []
                for n, p, now in zip(extent, self.padded, x.shape[2:]):
                    while p > now:
                        p, n = -(-p // 2), -(-n // 2)
                    region.append(slice(0, n))
                m[(0, slice(g * per, (g + 1) * per)) + tuple(region)] = 1.0
            self.masks[key] = m
        return self.masks[key]

    def batch_norm(self, bn):
        def forward(x):
            import torch

            m = self.mask(x)
            dims, shape = (0,) + tuple(range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
            count = m.sum(dims) * x.shape[0]
            xm = x * m
            centred = (xm - (xm.sum(dims) / count).view(shape)) * m
            var = (centred * centred).sum(dims) / count
            return (centred * torch.rsqrt(var + bn.eps).view(shape) * bn.weight.view(shape) + bn.bias.view(shape)) * m
        return forward

    def global_average(self, x):
        m = self.mask(x)
        dims = tuple(range(2, x.dim()))
        return (x * m).sum(dims, keepdim=True) / m.sum(dims, keepdim=True)


def padded_group(models, subdomains: list, masked: bool):
    """All of ``subdomains``' local CNNs as one fused model at the largest subimage shape, and its input
    shape. VGG's layers do not depend on the subimage shape (its head averages globally), so members of
    every shape fit one architecture."""
    from torch import nn

    m = models.manifest
    shapes = [m.subimage_shape(i) for i in subdomains]
    largest = tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))
    model = models.fused(list(subdomains), [None] * len(subdomains))
    if masked:
        padding = Padding(len(subdomains), shapes, largest)
        for layer in model.modules():
            if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm3d)):
                layer.forward = padding.batch_norm(layer)
            elif isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
                layer.forward = padding.global_average
    return model, (m.channels * len(subdomains),) + largest


def main() -> None:
    import torch

    from hpcdd.config import build_config, config_of_run
    from hpcdd.factory import Models
    from hpcdd.fused import shape_groups
    from hpcdd.manifest import load_manifest
    from hpcdd.parallel.ownership import ownership
    from hpcdd.training.acceleration import configure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a finished run (e.g. bench_speedup's run_fm4x4): its configuration and data")
    p.add_argument("--data", help="a data_prep output (default: Fashion-MNIST 4x4, overlap 1, 12000 images)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of 12 steps per model")
    args = p.parse_args()
    if args.run:
        cfg = config_of_run(args.run)
    else:
        data = args.data or prepared("4x4", 1, 12000, tempfile.mkdtemp(prefix="hpcdd-bench-tries-"))
        cfg = build_config(None, {"data": data, "out": "unused"})
    m = load_manifest(cfg.data)
    torch.set_num_threads(1)
    configure(cfg.performance)
    models = Models(cfg.model, cfg.dnn, m, cfg.seed, "cpu", cfg.performance)
    nchw = Models(cfg.model, cfg.dnn, m, cfg.seed, "cpu", dataclasses.replace(cfg.performance, channels_last="off"))
    glob = global_stepper(models, cfg, args.ranks)

    def grouped(source, groups, context=contextlib.nullcontext):
        return [group_stepper(source, g, cfg, context) for g in groups]

    def no_onednn():
        return torch.backends.mkldnn.flags(enabled=False)

    tries = {}
    for r in range(args.ranks):
        own = list(ownership(args.ranks, m.n, r).subdomains)
        hpcdd = shape_groups(models, own, cfg.performance.fuse_local, "cpu")
        per = {"hpcdd": grouped(models, hpcdd), "unfused": grouped(models, [[i] for i in own]),
               "oneDNN off": grouped(models, hpcdd, no_onednn), "channels_last off": grouped(nchw, hpcdd)}
        for name, masked in (("padded, unmasked", False), ("padded, masked", True)):
            model, shape = padded_group(models, own, masked)
            per[name] = [Stepper(model, shape, cfg.local.batch_size, m.k, cfg.local, len(own))]
        for name, steppers in per.items():
            tries.setdefault(name, []).append(steppers)
    everything = [glob] + [s for ranks in tries.values() for steppers in ranks for s in steppers]
    interleaved(everything, args.rounds)
    n = m.count("train")
    t_global = glob.per_step * math.ceil(n / cfg.global_.batch_size)
    base = None
    print(f"{m.dataset} {'x'.join(map(str, m.grid))}, {args.ranks} ranks, one thread, {args.rounds} x 12 steps per model "
          f"interleaved; global CNN {t_global:.2f} s an epoch on one rank's share\n")
    print("| try | busiest rank's local steps, s an epoch | per rank | kernel-bound | vs hpcdd |\n| --- | --- | --- | --- | --- |")
    for name, ranks in tries.items():
        per_rank = [sum(s.per_step for s in steppers) * math.ceil(n / cfg.local.batch_size) for steppers in ranks]
        busiest = max(per_rank)
        base = busiest if base is None else base
        print(f"| {name} | {busiest:.2f} | {' / '.join(f'{x:.2f}' for x in per_rank)} | {t_global / busiest:.2f}x | "
              f"{base / busiest:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
