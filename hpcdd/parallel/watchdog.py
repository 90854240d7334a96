"""The progress watchdog and the run lock: no job hangs on a stopped rank, no run directory has two owners.

Every rank runs one daemon thread. It ends this rank as soon as RUN/FAILED records another rank's
failure (checked every two seconds: a rank killed on another node leaves its peers waiting in MPI
otherwise). It writes a heartbeat (RUN/progress/alive_RRRR.json: wall
time, and when this rank last made progress) every ``beat`` seconds. Training steps, phase starts
and inference batches call ``alive()``, which only stores a time. A rank whose own progress is
older than ``watchdog_timeout`` reads every heartbeat: if some rank progressed recently it is only
waiting for that rank (the DNN on rank 0); if none did, the job is stuck. It then dumps its Python
stacks (RUN/progress/stack_RRRR.txt and stderr), names the ranks whose heartbeats stopped (a
stopped process, a rank stuck in the file system) and, after a grace period in which the other live
ranks dump theirs, the lowest live rank aborts the job. The heartbeat thread runs while the main
thread blocks in MPI (mpi4py releases the GIL), so waiting ranks keep beating and a silent one stands
out. Rank 0's thread also refreshes RUN/LOCK (every two seconds), which says which process owns the run directory.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import json
import os
import platform
import sys
import threading
import time

from .. import atomic
from ..errors import UserError

_last_progress = [time.time()]
FOLLOW_POLL = 2.0  # seconds between checks for RUN/FAILED (one stat) and refreshes of RUN/LOCK
LOCK_STALE = 20.0  # a lock of another host not refreshed for this long belongs to a dead run


def alive() -> None:
    """This rank made progress (a step, a batch of inference, a phase start): cheap, call it often."""
    _last_progress[0] = time.time()


_slow: list = [None]  # (what, since) while a step known to be slow runs: see slow_step
SLOW_STEP_LIMIT = 1800.0  # seconds such a step counts as progress; past it the watchdog judges it as any other


@contextlib.contextmanager
def slow_step(what: str):
    """A training's first step, in which ``torch.compile`` compiles (20-60 s per model on a CPU, minutes
    for large ones): it counts as progress for up to ``SLOW_STEP_LIMIT`` seconds, so a long compilation is
    not taken for a deadlock; should it hang past that, the watchdog's message says what was running."""
    _slow[0] = (what, time.time())
    alive()
    try:
        yield
    finally:
        _slow[0] = None
        alive()


def progress_time(now: float) -> float:
    """When this rank last made progress; a slow step within its limit is progress now."""
    slow = _slow[0]
    return now if slow is not None and now - slow[1] < SLOW_STEP_LIMIT else _last_progress[0]


def beat_interval(timeout: float) -> float:
    return 30.0 if timeout <= 0 else min(30.0, max(0.5, timeout / 10))


def silent_ranks(beats: dict, size: int, now: float, beat: float) -> list[int]:
    """Ranks whose heartbeat is missing or older than three beats: their process does not run."""
    return [r for r in range(size) if r not in beats or now - beats[r]["beat"] > 3 * beat]


def describe(ranks: list[int], procs: dict) -> str:
    return ", ".join(f"rank {r}" + (f" (pid {procs[r]['pid']} on {procs[r]['host']})" if r in procs else "")
                     for r in ranks)


class Watchdog:
    """One rank's heartbeat thread; see the module docstring."""

    def __init__(self, layout, world, timeout: float, procs: list[dict] | None = None):
        self.layout, self.world, self.timeout = layout, world, float(timeout)
        self.beat = beat_interval(self.timeout)
        self.procs = {p["rank"]: p for p in procs or []}
        self._stop = threading.Event()
        self._thread = None
        self.where = ""  # the phase, in the heartbeat and the message

    def path(self, rank: int) -> str:
        return os.path.join(self.layout.progress, f"alive_{rank:04d}.json")

    def start(self) -> "Watchdog":
        alive()
        self._write(time.time())
        self._thread = threading.Thread(target=self._run, name="hpcdd-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _write(self, now: float) -> None:
        try:
            atomic.write_json({"rank": self.world.rank, "beat": now, "progress": progress_time(now),
                                   "phase": self.where}, self.path(self.world.rank))
        except (OSError, UserError):
            pass  # a full or stuck file system must not kill the thread that reports it

    def _read(self) -> dict:
        beats = {}
        for r in range(self.world.size):
            try:
                with open(self.path(r)) as f:
                    beats[r] = json.load(f)
            except (OSError, ValueError):
                continue
        return beats

    def _run(self) -> None:
        written = time.time()
        while not self._stop.wait(min(self.beat, FOLLOW_POLL)):
            now = time.time()
            if os.path.exists(self.layout.failed):
                self._follow()
                return
            if self.world.is_root:
                try:
                    os.utime(self.layout.lock)
                except OSError:
                    pass
            if now - written < self.beat:
                continue
            written = now
            self._write(now)
            if self.timeout <= 0 or now - progress_time(now) < self.timeout:
                continue
            beats = self._read()
            latest = max([b.get("progress", 0.0) for b in beats.values()] + [progress_time(now)])
            if now - latest >= self.timeout:
                self._fire(now, beats)
                return

    def _follow(self) -> None:
        """Another rank's failure is recorded (a rank killed on another node, an abort): end this rank
        now instead of waiting in a collective for a peer that will never come (or for the launcher's
        kill, which SLURM sends only after KillWait)."""
        try:
            self.world.abort(1, "")
        finally:
            os._exit(1)

    def _fire(self, now: float, beats: dict) -> None:
        silent = silent_ranks(beats, self.world.size, now, self.beat)
        live = [r for r in range(self.world.size) if r not in silent]
        stacks = os.path.join(self.layout.progress, f"stack_{self.world.rank:04d}.txt")
        try:
            with open(stacks, "w") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            pass
        print(f"hpcdd watchdog: rank {self.world.rank} made no progress for {now - _last_progress[0]:.0f} s; "
              f"its Python stacks:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        what = (f"silent (no heartbeat for {3 * self.beat:.0f} s): {describe(silent, self.procs)}" if silent else
                "every rank is alive but none completes a step (a deadlock or a stuck collective)")
        slow = _slow[0]
        if slow is not None:
            what += f"; rank {self.world.rank} has been in {slow[0]} for {now - slow[1]:.0f} s"
        message = (f"hpcdd: no rank made progress for {self.timeout:.0f} s (watchdog_timeout){' in ' + self.where if self.where else ''}; "
                   f"{what}; stacks of the live ranks in {self.layout.progress}/stack_*.txt; ending the job")
        # let the other live ranks dump their stacks too, then the lowest live rank ends the job
        self._stop.wait(2 * self.beat if live and self.world.rank == live[0] else 6 * self.beat)
        print(message, file=sys.stderr, flush=True)
        try:
            self.world.abort(3, message)
        finally:
            os._exit(3)  # one process without MPI: SystemExit would end only this thread


# ---------------------------------------------------------------------------------------------- lock
def lock_owner(layout) -> dict | None:
    """The live owner of a run's lock, or None when there is none or it is stale: the run recorded a
    failure since it took the lock; on this host its process is gone; on another host its rank 0
    has not refreshed it (every two seconds) for ``LOCK_STALE`` seconds."""
    try:
        with open(layout.lock) as f:
            owner = json.load(f)
        taken = os.stat(layout.lock).st_ctime if "taken" not in owner else float(owner["taken"])
        age = time.time() - os.stat(layout.lock).st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None  # a torn lock: its writer died while writing it
    try:
        if os.stat(layout.failed).st_mtime >= taken:
            return None
    except OSError:
        pass
    if owner.get("host") == platform.node():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return None
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
        try:
            started = process_started(int(owner["pid"]))
        except (KeyError, ValueError, TypeError):
            started = None
        if started is not None and owner.get("started") is not None and started != owner["started"]:
            return None  # the pid now belongs to another process (the run's died, the number was reused)
        return owner
    return owner if age < LOCK_STALE else None


def process_started(pid: int) -> str | None:
    """When process ``pid`` started (boot id and clock ticks since boot, from /proc): with the pid, it
    names one process, also after the pid is reused. None where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return f"{boot}:{fields[19]}"
    except (OSError, IndexError):
        return None


def describe_owner(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"


def check_unlocked(layout, what: str) -> None:
    owner = lock_owner(layout)
    if owner is not None:
        raise UserError(f"{what}: {layout.root} is in use by a running hpcdd-run ({describe_owner(owner)}); "
                        f"wait for it to end or stop it first (if no hpcdd-run uses it, delete {layout.lock})")


def acquire(layout, what: str) -> None:
    """Rank 0: create RUN/LOCK (exclusively; a stale lock is replaced)."""
    owner = {"host": platform.node(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "taken": time.time(), "started": process_started(os.getpid())}
    for _ in range(2):
        try:
            fd = os.open(layout.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            check_unlocked(layout, what)
            try:
                os.unlink(layout.lock)  # stale: its owner is gone
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise UserError(f"{layout.lock}: cannot create the run lock ({e.strerror})") from None
            raise
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        return
    check_unlocked(layout, what)
    raise UserError(f"{layout.lock}: another hpcdd-run took the run directory at the same moment")


def release(layout) -> None:
    """Rank 0 at an orderly exit: remove RUN/LOCK if this process owns it."""
    try:
        with open(layout.lock) as f:
            owner = json.load(f)
        if owner.get("pid") == os.getpid() and owner.get("host") == platform.node():
            os.unlink(layout.lock)
    except (OSError, ValueError):
        pass
