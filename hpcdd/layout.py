"""The run directory: every path under RUN, in one place (docs/architecture.md, "Run directory").

Phases, the report, the runner and the failure handling ask this object for paths instead of
joining names by hand, so the layout can change in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RunLayout:
    root: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # files of the whole run (rank 0 writes them)
    @property
    def config(self) -> str:
        return self.path("config.json")

    @property
    def state(self) -> str:
        return self.path("state.json")

    @property
    def metrics(self) -> str:
        return self.path("metrics.jsonl")

    @property
    def ranks(self) -> str:
        return self.path("ranks.json")

    @property
    def failed(self) -> str:
        return self.path("FAILED")

    @property
    def failed_previous(self) -> str:
        return self.path("FAILED.previous")

    @property
    def results_json(self) -> str:
        return self.path("results.json")

    @property
    def results_md(self) -> str:
        return self.path("results.md")

    @property
    def progress(self) -> str:
        """rank_RRRR.json: each rank's counters of its current training (hpcdd.progress)."""
        return self.path("progress")

    @property
    def tensorboard(self) -> str:
        return self.path("tensorboard")

    @property
    def plots(self) -> str:
        return self.path("plots")

    @property
    def model(self) -> str:
        """The exported CNN-DNN (``hpcdd.export``)."""
        return self.path("model.pt")

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
    @property
    def dnn(self) -> str:
        return self.path("aggregate", "dnn.pt")

    @property
    def dnn_checkpoint(self) -> str:
        return self.path("aggregate", "dnn.ckpt.pt")

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
    @property
    def global_model(self) -> str:
        return self.path("global", "model.pt")

    @property
    def global_checkpoint(self) -> str:
        return self.path("global", "model.ckpt.pt")

    def local_models_of(self, method: str) -> tuple[callable, str]:
        """(subdomain -> local CNN file, DNN file) of a CNN-DNN row of the report."""
        if method == "CNN-DNN":
            return self.local_model, self.dnn
        strategy = method.split("(")[1].rstrip(")")
        return (lambda i: self.coherent_local(strategy, i)), self.coherent_dnn(strategy)
