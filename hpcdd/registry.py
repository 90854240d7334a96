"""The phases of a run, in order, and what each needs, costs and trains: the one registry a new phase
is added to (with its module under ``hpcdd/phases/``).

Each phase is a module of ``hpcdd.phases`` with a ``run(ctx)`` function; it writes its results under
``RUN/<phase>/`` and is marked complete in ``RUN/state.json``; a complete phase is skipped on
``--resume`` and an interrupted one continues from its checkpoints. This module imports nothing of
hpcdd and no torch: the configuration validates phase names against ``PHASES``, and the phase
modules are imported only when a phase runs. The data flow of a run and the collectives of each
phase: docs/architecture.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Work:
    """What a phase's cost (the run ETA) is computed from: split sizes, forward FLOPs per image."""

    n_train: int
    n_eval: int
    n_all: int  # every split: the aggregate phase's inference
    local: float  # the busiest rank's local CNNs together
    global_: float | None  # the global CNN's share of one rank (None: no full.h5)

    def training(self, epochs: int, per_image: float) -> float:
        """Training counts 3x the forward pass (forward + backward), validation 1x."""
        return epochs * (3 * self.n_train + self.n_eval) * per_image


def _none(cfg):
    return ()


@dataclass(frozen=True)
class Phase:
    name: str
    module: str  # hpcdd.phases.<module>.run(ctx)
    needs: Callable  # config -> the phases whose results it starts from
    summary: str  # one line for the log at its start
    cost: Callable = lambda cfg, work: 0.0  # (config, Work) -> forward FLOPs of the busiest rank, or None
    trainings: Callable = _none  # config -> (key, TrainConfig) of each training, checked before any starts
    decomposed: bool = True  # its trainings see subimages (a flip needs a grid that mirrors); False: the baseline
    reported: bool = False  # its module's rows(results) makes rows of the report's table (hpcdd.table)

    def function(self):
        return importlib.import_module(f"hpcdd.phases.{self.module}").run

    def rows(self, results) -> list:
        """This phase's rows of the report's table, from what the run's phases wrote (hpcdd.table)."""
        return importlib.import_module(f"hpcdd.phases.{self.module}").rows(results) if self.reported else []



REGISTRY = (
    Phase("local", "local", _none, "each rank trains the local CNNs of its subdomains",
          cost=lambda cfg, w: w.training(cfg.local.epochs, w.local),
          trainings=lambda cfg: (("local", cfg.local),)),
    Phase("aggregate", "aggregate", lambda cfg: ("local",),
          "local outputs gathered at rank 0, which trains the DNN and scores average and vote",
          cost=lambda cfg, w: w.n_all * w.local, reported=True),
    Phase("coherent", "coherent",
          lambda cfg: ("local", "aggregate") if "transfer" in cfg.coherent.strategies else (),
          "the whole CNN-DNN trained end to end, model-parallel",
          cost=lambda cfg, w: sum(w.training(getattr(cfg.coherent, s).epochs, w.local) for s in cfg.coherent.strategies),
          trainings=lambda cfg: (("coherent.scratch", cfg.coherent.scratch), ("coherent.transfer", cfg.coherent.transfer)),
          reported=True),
    Phase("global", "global_cnn", _none, "the global CNN baseline, data-parallel over all ranks",
          cost=lambda cfg, w: None if w.global_ is None else w.training(cfg.global_.epochs, w.global_),
          trainings=lambda cfg: (("global", cfg.global_),), decomposed=False, reported=True),
    Phase("report", "report", _none, "results.json, results.md, plots and the exported CNN-DNN"),
)
PHASES = tuple(p.name for p in REGISTRY)
BY_NAME = {p.name: p for p in REGISTRY}


def table_rows(results) -> list:
    """Every phase's rows, the baseline's first, then the decomposed methods' in phase order."""
    return [r for p in sorted(REGISTRY, key=lambda p: p.decomposed) for r in p.rows(results)]
