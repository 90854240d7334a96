"""Wall time of the decomposed pipeline (local + aggregate) against the global CNN, same epochs, same ranks,
next to the FLOP-ideal speedup: the efficiency of the decomposition on this machine.

    python benchmarks/bench_speedup.py [--ranks 4] [--cases fm2x2 fm4x4 fm112] [--epochs 3] [--train 12000]

Runs ``hpcdd.run --phases local,aggregate,global,report`` under ``mpiexec -n RANKS`` on real
Fashion-MNIST for each case and prints, from its results.json: training FLOPs per image (forward +
backward) of the global CNN and the local CNNs, the FLOP-ideal speedup (the busiest rank's local work
against the global CNN's work spread over all ranks), the measured speedup, their ratio (efficiency;
targets of issue #11: >= 0.75 for 2x2, >= 0.5 for 4x4 and the 112x112 case), where the aggregate phase
spends its time, and the test accuracies. Cases: ``fm2x2`` (28x28, VGG, overlap 1), ``fm4x4`` (28x28,
VGG, overlap 1), ``fm112`` (every image upsampled to 112x112, ResNet-18 layout with widths 16..128, 4x4
grid with overlap 4, the smallest at which every subimage has the 32 pixels the layout needs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import FASHION, launch, prepared  # noqa: E402

TARGETS = {"fm2x2": 0.75, "fm4x4": 0.5, "fm112": 0.5}


def upsampled(work: str, train: int, test: int, size: int = 112) -> str:
    """Fashion-MNIST upsampled (bilinear) to size x size, prepared on a 4x4 grid with overlap 4."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from data_prep.cli import run
    from data_prep.sources import read_idx

    out = os.path.join(work, f"fm{size}_4x4_{train}")
    if os.path.exists(out):
        return out

    def up(x):
        t = torch.from_numpy(x[:, None].astype(np.float32))
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).round().clamp(0, 255) \
            .to(torch.uint8)[:, 0].numpy()
    x = read_idx(f"{FASHION}/train-images-idx3-ubyte.gz")[:train]
    y = read_idx(f"{FASHION}/train-labels-idx1-ubyte.gz")[:train]
    xt = read_idx(f"{FASHION}/t10k-images-idx3-ubyte.gz")[:test]
    yt = read_idx(f"{FASHION}/t10k-labels-idx1-ubyte.gz")[:test]
    npz = os.path.join(work, f"fm{size}.npz")
    np.savez(npz, x=up(x), y=y, x_test=up(xt), y_test=yt)
    run(["npz", npz, out, "--grid", "4x4", "--overlap", "4", "--name", f"fashion-mnist-{size}", "--quiet"])
    os.unlink(npz)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--cases", nargs="+", default=["fm2x2", "fm4x4", "fm112"], choices=sorted(TARGETS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train", type=int, default=12000)
    p.add_argument("--train-112", type=int, default=4000, help="training images of the 112x112 case")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="hpcdd-bench-speedup-")
    lines = []
    for case in args.cases:
        extra = []
        if case == "fm112":
            data = upsampled(work, args.train_112, 1000)
            toml = os.path.join(work, "resnet18.toml")
            with open(toml, "w") as f:
                f.write('[model]\nfamily = "resnet18"\nwidths = [16, 32, 64, 128]\n')
            extra = ["--config", toml]
        else:
            data = prepared(case[2:], 1, args.train, work)
        out = os.path.join(work, f"run_{case}")
        launch(["-m", "hpcdd.run", "--data", data, "--out", out, "--phases", "local,aggregate,global,report",
                "--epochs", str(args.epochs), *extra], ranks=args.ranks)
        r = json.load(open(os.path.join(out, "results.json")))
        agg = json.load(open(os.path.join(out, "aggregate", "result.json"))).get("seconds", {})
        rows = {row["method"]: row for row in r["rows"]}
        f = r["train_flops_per_image"]
        eff = r.get("efficiency")
        verdict = "PASS" if eff is not None and eff >= TARGETS[case] else "FAIL"
        lines.append(f"| {case} | {f['global'] / 1e6:.1f} | {max(f['local']) / 1e6:.2f} x {len(f['local'])} | "
                     f"{r['flop_ideal_speedup']:.2f}x | {r['speedup_decomposed_over_global']:.2f}x | {eff:.2f} "
                     f"(>= {TARGETS[case]}: {verdict}) | {r['decomposed_seconds']:.1f} | {r['global_seconds']:.1f} |")
        print(f"{case}: {args.ranks} ranks x {r['threads_per_rank']} thread(s), {args.epochs} epochs, "
              f"{r['splits']['train']} training images: local+aggregate {r['decomposed_seconds']:.1f} s, "
              f"global CNN {r['global_seconds']:.1f} s; FLOP-ideal {r['flop_ideal_speedup']:.2f}x, measured "
              f"{r['speedup_decomposed_over_global']:.2f}x, efficiency {eff:.2f} (target {TARGETS[case]}: {verdict}); "
              f"test accuracy CNN-DNN {rows['CNN-DNN']['test']:.4f}, global {rows['global CNN']['test']:.4f}", flush=True)
        if agg:
            print(f"  aggregate phase {agg['total']:.1f} s: inference {sum(agg['inference'].values()):.1f} s, waiting "
                  f"for other ranks {sum(agg['gather'].values()):.1f} s, DNN {agg['dnn']:.1f} s, rest {agg['other']:.1f} s",
                  flush=True)
    print("\n| case | global MFLOP/image | local MFLOP/image | FLOP-ideal | measured | efficiency | "
          "local+aggregate s | global s |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
