"""Report phase: rank 0 writes the paper's comparison (``hpcdd.report``) and exports the CNN-DNN."""

from __future__ import annotations
from ..report import write_report


def run(ctx) -> None:
    if ctx.world.is_root:
        write_report(ctx)
    ctx.world.barrier()
    ctx.mark_done("report")
