"""The GPU check: one prepared script for a session lent one GPU (at most 8 minutes), one table out.

    python benchmarks/gpu_check.py [--budget 480]

Rows: device pinning of 4 ranks sharing the GPU (RUN/ranks.json); the README demo, small, with
``--device cuda`` on 1 rank and on 4 ranks sharing the GPU (wall time, CNN-DNN and global accuracy);
bench_local on the GPU (hpcdd / a bare PyTorch loop, target >= 0.95); the decomposition's speedup on
the GPU (bench_speedup's 2x2 case: local + aggregate against the global CNN, FLOP-ideal, efficiency);
``performance.compile`` on/off and ``performance.autocast`` bf16/off (local-phase images/s). Where no
CUDA device is visible it stops at once with one line and exit status 2, before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, mpiexec, prepared  # noqa: E402


def no_gpu() -> str | None:
    """Why this check cannot run here (None: it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (f"no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return None


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run(args, budget: Budget, ranks: int | None = None) -> tuple[str, float]:
    """(stdout, seconds) of ``python ARGS`` (under mpiexec with ``ranks``), bounded by the budget left."""
    cmd = [sys.executable, *map(str, args)]
    if ranks:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, budget.left()), cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-12:])}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout, time.perf_counter() - t0


def hpcdd_run(data: str, out: str, budget: Budget, ranks: int | None, *extra) -> dict:
    _, seconds = run(["-m", "hpcdd.run", "--data", data, "--out", out, "--device", "cuda", *extra], budget, ranks)
    res = json.load(open(os.path.join(out, "results.json"))) if os.path.exists(os.path.join(out, "results.json")) else {}
    return dict(res, wall=seconds)


def local_rate(out: str) -> float:
    """Local-phase training images/s summed over the subdomains (metrics.jsonl)."""
    images = seconds = 0.0
    for line in open(os.path.join(out, "metrics.jsonl")):
        e = json.loads(line)
        if e.get("phase") == "local" and "images_per_s" in e:
            images += e["images_per_s"] * e["seconds"]
            seconds += e["seconds"]
    return images / max(seconds, 1e-9)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    args = p.parse_args()
    why = no_gpu()
    if why:
        print(f"gpu_check: {why}; this check needs one GPU (run it where the device is lent)", file=sys.stderr)
        return 2
    import torch

    budget = Budget(args.budget)
    work = tempfile.mkdtemp(prefix="hpcdd-gpu-check-")
    rows = [("device", torch.cuda.get_device_name(0), f"torch {torch.__version__}, CUDA {torch.version.cuda}", "")]

    def row(name, setting, measured, verdict=""):
        rows.append((name, setting, measured, verdict))
        print(f"{name}: {setting}: {measured} {verdict}", flush=True)

    def attempt(name, fn):
        if budget.left() < 20:
            row(name, "-", "skipped: the budget is spent")
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failed row must not hide the others
            row(name, "-", f"FAILED: {str(e)[:200]}")

    data = prepared("2x2", 1, 6000, work)
    small = ["--epochs", "2", "--threads", "2"]

    def pinning():
        out = os.path.join(work, "pin")
        hpcdd_run(data, out, budget, 4, "--phases", "local", "--epochs", "1", "--threads", "2")
        devices = [r["device"] for r in json.load(open(os.path.join(out, "ranks.json")))["ranks"]]
        row("device pinning, 4 ranks, 1 GPU", "ranks 0-3", ", ".join(devices),
            "PASS" if all(d.startswith("cuda") for d in devices) else "FAIL")

    def demo(ranks):
        def go():
            r = hpcdd_run(data, os.path.join(work, f"demo{ranks}"), budget, ranks, *small)
            rows_ = {x["method"]: x for x in r["rows"]}
            row(f"README demo, 6000 images, 2 epochs, {ranks} rank(s) on the GPU", f"{r['wall']:.0f} s wall",
                f"CNN-DNN test {rows_['CNN-DNN']['test']:.4f}, global {rows_['global CNN']['test']:.4f}, "
                f"local+aggregate {r['decomposed_seconds']:.1f} s vs global {r['global_seconds']:.1f} s "
                f"({r['speedup_decomposed_over_global']:.2f}x; FLOP-ideal {r['flop_ideal_speedup']:.2f}x, "
                f"efficiency {r['efficiency']:.2f})")
        return go

    def bench_local():
        out, _ = run(["benchmarks/bench_local.py", "--device", "cuda", "--train", "6000", "--repeats", "2",
                      "--threads", "2"], budget)
        ratio = float(re.search(r"hpcdd / bare = ([0-9.]+)", out).group(1))
        row("bench_local on the GPU", "hpcdd / bare PyTorch loop", f"{ratio:.3f}",
            "PASS (>= 0.95)" if ratio >= 0.95 else "FAIL (< 0.95)")

    def switch(key, values):
        def go():
            rates = []
            for v in values:
                out = os.path.join(work, f"{key.split('.')[-1]}_{v}")
                hpcdd_run(data, out, budget, None, "--phases", "local", *small, "--set", f"{key}={v}")
                rates.append(f"{v}: {local_rate(out):.0f} img/s")
            row(f"{key}", "local phase, 1 rank", "; ".join(rates))
        return go

    for name, fn in (("device pinning", pinning), ("demo 1 rank", demo(1)), ("bench_local", bench_local),
                     ("demo 4 ranks", demo(4)), ("compile", switch("performance.compile", ("off", "on"))),
                     ("bf16", switch("performance.autocast", ("off", "bf16")))):
        attempt(name, fn)
    print("\n| check | setting | measured | verdict |\n| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
