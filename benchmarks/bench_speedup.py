"""Wall time of the decomposed pipeline (local + aggregate) against the global CNN, same epochs, same ranks.

    python benchmarks/bench_speedup.py [--ranks 4] [--grids 2x2 4x4] [--epochs 3] [--train 12000]

Runs ``hpcdd.run --phases local,aggregate,global,report`` under ``mpiexec -n RANKS`` on real
Fashion-MNIST for each grid and prints the speedup and the accuracies from its results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import launch, prepared  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--grids", nargs="+", default=["2x2", "4x4"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train", type=int, default=12000)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="hpcdd-bench-speedup-")
    for grid in args.grids:
        data = prepared(grid, 1, args.train, work)
        out = os.path.join(work, f"run_{grid}")
        launch(["-m", "hpcdd.run", "--data", data, "--out", out, "--phases", "local,aggregate,global,report",
                "--epochs", str(args.epochs)], ranks=args.ranks)
        r = json.load(open(os.path.join(out, "results.json")))
        rows = {row["method"]: row for row in r["rows"]}
        print(f"grid {grid}, {args.ranks} ranks x {r['threads_per_rank']} thread(s), {args.epochs} epochs, "
              f"{r['splits']['train']} training images: local+aggregate {r['decomposed_seconds']:.1f} s, "
              f"global CNN {r['global_seconds']:.1f} s, speedup {r['speedup_decomposed_over_global']:.2f}x; "
              f"test accuracy CNN-DNN {rows['CNN-DNN']['test']:.4f}, global {rows['global CNN']['test']:.4f}")


if __name__ == "__main__":
    main()
