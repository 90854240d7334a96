"""Distributed coherent CNN-DNN step against the single-process step on the same total cores.

    python benchmarks/bench_coherent.py [--ranks 2 4] [--grid 2x2] [--steps 40]

For each P: ``mpiexec -n P`` ranks with one thread each run the model-parallel step (local forward,
Allgatherv of (B, K) outputs, replicated DNN, backward into own CNNs); one process with P threads
runs the single-process CNN-DNN step on the same minibatches. Printed: both step times, their ratio
(single / distributed; target >= 0.9) and the share of the distributed step spent communicating.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import launch, prepared  # noqa: E402


def worker(mode: str, data: str, steps: int, threads: int, batch: int) -> None:
    import torch
    import torch.nn.functional as F

    from hpcdd.coherent import CoherentModel, DistributedCoherent
    from hpcdd.config import build_config
    from hpcdd.factory import DataCache, Models
    from hpcdd.manifest import load_manifest
    from hpcdd.parallel.launcher import WorldInfo
    from hpcdd.parallel.ownership import ownership, slice_rows
    from hpcdd.parallel.world import World, init_world
    from hpcdd.training.engine import make_optimizer
    from hpcdd.training.rng import stream_of

    manifest = load_manifest(data)
    n = manifest.n
    if mode == "dist":
        world = init_world(device="cpu", threads=1)
        world.set_ownership(n)
    else:
        torch.set_num_threads(threads)
        world = World(WorldInfo(0, 1, 0, 1, "none"), device=torch.device("cpu"), threads=threads)
        world.own = ownership(1, n, 0)
    cfg = build_config({}, {"data": data, "out": "unused"})
    models, data_of = Models(cfg.model, cfg.dnn, manifest, cfg.seed), DataCache(manifest, cfg.memory_limit_gb)
    own = world.own
    stream = stream_of(0, "coherent scratch")
    batches = stream.batches(0, manifest.count("train"), batch)[: steps + 5]
    first = own.subdomains[0]
    y_all = data_of(first, "train").y
    if mode == "dist":
        model = DistributedCoherent(world, DistributedCoherent.alone({i: models.local(i) for i in own.subdomains}), models.dnn(), n)
    else:
        model = CoherentModel([models.local(i) for i in range(n)], models.dnn())
    opt = make_optimizer(list(model.parameters()), cfg.coherent.scratch)
    times = []
    for step, rows in enumerate(batches):
        if step == 5:
            model.comm_time = 0.0
        t0 = time.perf_counter()
        y = y_all[torch.from_numpy(rows)]
        if mode == "dist":
            mine = rows[slice_rows(len(rows), own.replicas, own.replica)]
            xs = {i: data_of(i, "train").batch(mine)[0] for i in own.subdomains}
            model.step(xs, y, len(rows), opt, stream.step_counters(0, step))
        else:
            loss = F.cross_entropy(model([data_of(i, "train").batch(rows)[0] for i in range(n)],
                                         stream.step_counters(0, step)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if step >= 5:
            times.append(time.perf_counter() - t0)
    if world.is_root:
        comm = getattr(model, "comm_time", 0.0)
        print(json.dumps({"step_s": sum(times) / len(times), "comm_share": comm / sum(times)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--grid", default="2x2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--mode", choices=("driver", "dist", "single"), default="driver")
    p.add_argument("--data")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.mode != "driver":
        return worker(args.mode, args.data, args.steps, args.threads, args.batch)
    data = prepared(args.grid, 1, 12000)
    cores = os.cpu_count()
    me = os.path.abspath(__file__)
    common = ["--data", data, "--steps", str(args.steps), "--batch", str(args.batch)]
    for ranks in args.ranks:
        dist = json.loads(launch([me, "--mode", "dist", *common], ranks=ranks).strip().splitlines()[-1])
        single = json.loads(launch([me, "--mode", "single", "--threads", str(ranks), *common]).strip().splitlines()[-1])
        ratio = single["step_s"] / dist["step_s"]
        note = "" if ranks <= cores else f" (oversubscribed: {ranks} ranks on {cores} cores)"
        print(f"grid {args.grid}, batch {args.batch}, P={ranks}{note}: distributed step {dist['step_s'] * 1e3:.1f} ms "
              f"(communication {100 * dist['comm_share']:.1f} %), single process with {ranks} threads "
              f"{single['step_s'] * 1e3:.1f} ms; ratio single/distributed = {ratio:.2f} "
              f"(target >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})")


if __name__ == "__main__":
    main()
