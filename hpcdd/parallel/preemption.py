"""Preemption: a signal only sets a flag; ranks agree at step boundaries, checkpoint, and exit.

Nothing is written inside the signal handler. Phases that train in lockstep (coherent, global)
agree with one tiny Allreduce per step, so every rank stops after the same step. In the local
phase ranks train independently: the rank that got the signal tells the others with a small
message on a private communicator, and each rank stops at its own next step boundary (replicas of
a subdomain agree within their group). Every rank then meets at one barrier, rank 0 records the
stop in ``state.json``, requeues the SLURM job if asked to, and all exit with ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from ..errors import UserError
from .collectives import Group

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed and stopped; continue with --resume RUN
_TAG = 7207


class Preempted(Exception):
    """Raised at a step boundary once the ranks agreed to stop; ``synced`` after the final barrier."""

    def __init__(self, synced: bool = False):
        super().__init__("preempted")
        self.synced = synced


def parse_signals(names) -> list[int]:
    out = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if not hasattr(signal, key) or key in ("SIGKILL", "SIGSTOP"):
            raise UserError(f"preemption.signals: {name!r} is not a signal that can be caught (e.g. SIGUSR1, SIGTERM)")
        out.append(int(getattr(signal, key)))
    return out


class StopFlag:
    def __init__(self, world, signals=()):
        self.world = world
        self.flag = False
        self.announced = False
        self.signum = None
        self.ctrl = world.comm.Dup() if world.comm is not None and world.size > 1 else None
        self._requests = []
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.flag = True
        self.signum = signum

    def poll_independent(self, group: Group = Group()) -> bool:
        """For ranks that do not train in lockstep: announce our flag, look for others' announcements."""
        if self.ctrl is not None:
            if self.flag and not self.announced:
                token = np.ones(1, dtype=np.int32)
                for r in range(self.world.size):
                    if r != self.world.rank:
                        self._requests.append(self.ctrl.Isend(token, dest=r, tag=_TAG))
                self.announced = True
            if not self.flag and self.ctrl.Iprobe(tag=_TAG):
                self.flag = True
                self.announced = True  # the sender told everyone
        return group.any(self.flag)

    def poll_collective(self) -> bool:
        """For lockstep phases: one Allreduce per step; every rank stops after the same step.

        The flag is only ever set here, never overwritten with the agreed value: a signal whose
        handler runs while the Allreduce is in flight would otherwise be lost (seen on 8 ranks)."""
        agreed = self.world.everyone.any(self.flag)
        if agreed:
            self.flag = True
        return agreed  # the agreed value: a flag set meanwhile counts at the next poll, on every rank

    def agree(self) -> bool:
        return self.poll_collective()

    def drain(self) -> None:
        """Receive pending announcements and complete our sends, so MPI can finalise cleanly."""
        if self.ctrl is None:
            return
        token = np.zeros(1, dtype=np.int32)
        while True:  # a matched probe: Iprobe + Recv(ANY_SOURCE) hung across nodes (MPICH over TCP)
            message = self.ctrl.Improbe(tag=_TAG)
            if message is None:
                break
            message.Recv(token)
        from mpi4py import MPI

        MPI.Request.Waitall(self._requests)
        self._requests = []


REQUEUE_GRACE = 60.0  # seconds a rank waits for SLURM to end it after a requeue


def await_requeue_kill(grace: float = REQUEUE_GRACE) -> None:
    """Under SLURM, wait (at most ``grace`` s) for the requeue to end this process with the job.

    No rank exits first: srun --kill-on-bad-exit would take an early exit 75 for a failure and end
    the step while rank 0 is still requeueing, and a batch script that exits on its own before the
    requeue lands can leave the job FAILED instead of pending. If rank 0's requeue fails it exits
    75 at once and srun ends the waiting ranks; the preemption signals kill again (default action)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    time.sleep(grace)


def requeue_slurm_job(log) -> bool:
    """``scontrol requeue $SLURM_JOB_ID``: the job goes back to the queue and resumes by itself."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" or os.environ.get("SLURM_JOB_ID")
    if not job:
        log("preemption.requeue is set but this is not a SLURM job; resume with --resume")
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"hpcdd: scontrol requeue {job} failed: {e}", file=sys.stderr, flush=True)
        return False
    if proc.returncode != 0:
        print(f"hpcdd: scontrol requeue {job} failed: {proc.stderr.strip()}", file=sys.stderr, flush=True)
        return False
    log(f"requeued SLURM job {job}")
    return True
