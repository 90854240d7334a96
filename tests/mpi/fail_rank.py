"""Run hpcdd.run with rank FAIL_RANK raising inside the local phase after a short delay."""

import os
import sys
import time

from hpcdd import phases, run

fail_rank = int(os.environ["FAIL_RANK"])
original = phases.PHASE_FUNCTIONS["local"]


def failing_local(ctx):
    if ctx.world.rank == fail_rank:
        time.sleep(1.0)
        raise RuntimeError("injected failure for the test")
    original(ctx)


phases.PHASE_FUNCTIONS["local"] = failing_local
sys.exit(run.main(sys.argv[1:]))
