"""Run hpcdd.run with rank FAIL_RANK raising inside the local phase after a short delay."""

import os
import sys
import time

from hpcdd import run
from hpcdd.phases import local

fail_rank = int(os.environ["FAIL_RANK"])
original = local.run


def failing_local(ctx):
    if ctx.world.rank == fail_rank:
        time.sleep(1.0)
        raise RuntimeError("injected failure for the test")
    original(ctx)


local.run = failing_local
sys.exit(run.main(sys.argv[1:]))
