"""The report's table: one row per method, each made by the phase that trained it.

A phase module that has rows in the table defines ``rows(results: PhaseResults) -> list[dict]`` and
says so in its registry entry (``hpcdd.registry``); the report asks every such phase, the baseline's
rows first. A row carries a stable ``key`` (what code selects rows by), the ``method`` label the
tables show, and, for a CNN-DNN, ``cnn_dnn``: where its local CNNs and DNN are (``RunLayout.cnn_dnn``).
"""

from __future__ import annotations

import os

from . import atomic

SCORES = ("test_balanced", "test_auc")  # the test scores beside accuracy (hpcdd.metrics)


class PhaseResults:
    """What the phases of a run wrote (``RUN/<phase>[/<strategy>]/result.json``), each file read once,
    and the figures several phases' rows share."""

    def __init__(self, cfg, layout):
        self.cfg, self.layout = cfg, layout
        self._read: dict = {}

    def of(self, phase: str, *sub: str) -> dict | None:
        """A phase's result.json, None while the phase has not finished."""
        key = (phase, *sub)
        if key not in self._read:
            path = self.layout.result(phase, *sub)
            self._read[key] = atomic.read_json(path) if os.path.exists(path) else None
        return self._read[key]

    @property
    def local_parameters(self) -> int | None:
        local = self.of("local")
        return sum(s["parameters"] for s in local["subdomains"]) if local else None

    @property
    def aggregate_seconds(self) -> float | None:
        """The whole aggregate phase on rank 0 (inference, gathering, the DNN's training); runs written
        before it had its own field kept it as ``dnn.wall_seconds``."""
        agg = self.of("aggregate")
        return None if agg is None else agg.get("wall_seconds", agg["dnn"].get("wall_seconds"))

    @property
    def decomposed_seconds(self) -> float | None:
        """The decomposed pipeline's wall time: local + aggregate (what average, vote and CNN-DNN cost)."""
        local = self.of("local")
        return local["wall_seconds"] + self.aggregate_seconds if local and self.of("aggregate") else None

    @property
    def cnn_dnn_parameters(self) -> int | None:
        agg = self.of("aggregate")
        return self.local_parameters + agg["dnn"]["parameters"] if agg and self.of("local") else None


def row(key: str, method: str, val, test, parameters, seconds, epochs=None, scored: dict | None = None,
        **extra) -> dict:
    """One row: accuracies, the test scores ``scored`` holds, parameters, training wall time and its
    share per epoch."""
    more = {k: scored[k] for k in SCORES if scored and k in scored}
    return dict(key=key, method=method, val=val, test=test, **more, parameters=parameters, train_seconds=seconds,
                seconds_per_epoch=(seconds / epochs if seconds is not None and epochs else None), **extra)
