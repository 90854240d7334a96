"""The phases of a run, in order, and what each needs: the one registry a new phase is added to
(with its module under ``hpcdd/phases/``).

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
class Phase:
    name: str
    module: str  # hpcdd.phases.<module>.run(ctx)
    needs: Callable  # config -> the phases whose results it starts from
    summary: str  # one line for the log at its start

    def function(self):
        return importlib.import_module(f"hpcdd.phases.{self.module}").run


REGISTRY = (
    Phase("local", "local", lambda cfg: (), "each rank trains the local CNNs of its subdomains"),
    Phase("aggregate", "aggregate", lambda cfg: ("local",),
          "local outputs gathered at rank 0, which trains the DNN and scores average and vote"),
    Phase("coherent", "coherent",
          lambda cfg: ("local", "aggregate") if "transfer" in cfg.coherent.strategies else (),
          "the whole CNN-DNN trained end to end, model-parallel"),
    Phase("global", "global_cnn", lambda cfg: (), "the global CNN baseline, data-parallel over all ranks"),
    Phase("report", "report", lambda cfg: (), "results.json, results.md, plots and the exported CNN-DNN"),
)
PHASES = tuple(p.name for p in REGISTRY)
BY_NAME = {p.name: p for p in REGISTRY}
