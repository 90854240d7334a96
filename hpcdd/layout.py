"""The run directory: every path under RUN, in one place (docs/architecture.md, "Run directory").

Phases, the report, the runner and the failure handling ask this object for paths instead of
joining names by hand, so the layout can change in one place.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


# every top-level entry of RUN that hpcdd-run writes
RUN_ENTRIES = frozenset({"config.json", "state.json", "metrics.jsonl", "ranks.json", "FAILED", "FAILED.previous",
                         "LOCK", ".reserve", "results.json", "results.md", "progress", "tensorboard", "plots",
                         "model.pt", "local", "aggregate", "coherent", "global"})


def _at(*parts: str) -> property:
    return property(lambda self: self.path(*parts))


@dataclass(frozen=True)
class RunLayout:
    root: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # files of the whole run (rank 0 writes them)
    config = _at("config.json")
    state = _at("state.json")
    metrics = _at("metrics.jsonl")
    ranks = _at("ranks.json")
    failed = _at("FAILED")
    lock = _at("LOCK")
    reserve = _at(".reserve")  # space kept for RUN/FAILED on a full disk (hpcdd.parallel.failures)  # the process that owns the run directory now (hpcdd.parallel.watchdog)
    failed_previous = _at("FAILED.previous")
    results_json = _at("results.json")
    results_md = _at("results.md")
    progress = _at("progress")  # rank_RRRR.json: training counters (hpcdd.progress); alive_RRRR.json: heartbeats
    # and stack_RRRR.txt: Python stacks dumped by the watchdog (hpcdd.parallel.watchdog)
    tensorboard = _at("tensorboard")
    plots = _at("plots")
    model = _at("model.pt")  # the exported CNN-DNN (hpcdd.export)

    def foreign(self) -> list[str]:
        """What RUN holds that hpcdd-run did not write (``--force`` replaces only a run's own entries)."""
        def ours(name: str) -> bool:
            temporary = re.fullmatch(r"\.(.+)\.\w+\.tmp", name)  # an atomic write cut short (atomic.py)
            return name in RUN_ENTRIES or bool(temporary and temporary.group(1) in RUN_ENTRIES)
        return sorted(n for n in os.listdir(self.root) if not ours(n))

    # phase directories
    def phase_dir(self, phase: str, *sub: str) -> str:
        return self.path(phase, *sub)

    def result(self, phase: str, *sub: str) -> str:
        """``RUN/<phase>[/<strategy>]/result.json``: what the report reads."""
        return self.path(phase, *sub, "result.json")

    # local
    def local_model(self, i: int) -> str:
        return self.path("local", f"sub_{i:03d}.pt")

    def local_checkpoint(self, i: int) -> str:
        return self.path("local", f"sub_{i:03d}.ckpt.pt")

    # aggregate
    dnn = _at("aggregate", "dnn.pt")
    dnn_checkpoint = _at("aggregate", "dnn.ckpt.pt")

    def probs(self, split: str) -> str:
        return self.path("aggregate", f"probs_{split}.npz")

    # coherent
    def coherent_local(self, strategy: str, i: int) -> str:
        return self.path("coherent", strategy, f"sub_{i:03d}.pt")

    def coherent_dnn(self, strategy: str) -> str:
        return self.path("coherent", strategy, "dnn.pt")

    def coherent_checkpoint(self, strategy: str, rank: int) -> str:
        return self.path("coherent", strategy, f"rank_{rank:04d}.ckpt.pt")

    # global
    global_model = _at("global", "model.pt")
    global_checkpoint = _at("global", "model.ckpt.pt")

    def cnn_dnn(self, where: list) -> tuple[callable, str]:
        """(subdomain -> local CNN file, DNN file) of a CNN-DNN the report's row places at ``where``
        (its ``cnn_dnn``): ["aggregate"] or ["coherent", strategy]."""
        if where[0] == "aggregate":
            return self.local_model, self.dnn
        return (lambda i: self.coherent_local(where[1], i)), self.coherent_dnn(where[1])
