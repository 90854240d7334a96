"""Failure handling: any exception on one rank ends the whole job, and RUN/FAILED says who and why.

A rank that raises prints its traceback and aborts every rank (``MPI_Abort``); a rank killed by a
signal is named by a tiny watcher process; a user error is one line and exit status 2.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import TYPE_CHECKING

from ..errors import EXIT_USER_ERROR, fail
from ..layout import RunLayout

if TYPE_CHECKING:
    from .world import World

_orderly_exit = None  # tells this rank's watcher that the exit is deliberate
_tell_watch = None  # tells this rank's watcher where it is (MPI initialisation begins/ends)

_DEATH_WATCH = r"""
import os, sys
rank, pid, host, marker = sys.argv[1:5]
launchers = [int(p) for p in sys.argv[5:]]  # the rank's parent and grandparent (launcher, its proxy)
said = sys.stdin.buffer.read()  # end of file when the rank exits, however it exits
if said.endswith(b"ok"):
    sys.exit(0)

def gone(p):
    try:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True

dead = [p for p in launchers if p > 1 and gone(p)]
if said.endswith(b"i"):  # MPI initialisation began and never returned
    msg = (f"hpcdd: rank {rank} (pid {pid} on {host}) ended inside MPI initialisation (the MPI library's own "
           f"message is above): under srun use the plugin of your MPI, `srun --mpi=pmix` for Open MPI, "
           f"`srun --mpi=pmi2` for MPICH (`srun --mpi=list` shows what the cluster offers)")
elif dead:
    msg = (f"hpcdd: rank {rank} (pid {pid} on {host}) was killed together with its launcher (pid "
           f"{', '.join(map(str, dead))} gone): the job was ended from outside (a killed mpiexec or srun, "
           f"scancel, a lost node), not by a failure of hpcdd; continue with --resume")
else:
    msg = (f"hpcdd: rank {rank} (pid {pid} on {host}) died without a Python error: killed by a signal "
           f"(SIGKILL, or the out-of-memory killer) or ended inside a C library; the launcher ends the other ranks")
try:
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
except FileNotFoundError:
    fd = None
except OSError:
    sys.exit(0)  # a failure was already reported (this rank was ended by the launcher's clean-up)
if fd is not None:
    try:
        os.write(fd, (msg + "\n").encode())
    except OSError:  # a full disk: give up the reserved space for the report
        try:
            os.unlink(os.path.join(os.path.dirname(marker), ".reserve"))
            os.write(fd, (msg + "\n").encode())
        except OSError:
            pass
    os.close(fd)
print(msg, file=sys.stderr, flush=True)
"""


def failure_marker(run_dir: str) -> str:
    return RunLayout(run_dir).failed


def start_death_watch(rank: int, run_dir: str) -> None:
    """A tiny watcher process per rank that names the rank if it dies without a Python error.

    Started before MPI initialises (no fork after MPI_Init). The rank says "ok" on every orderly
    exit; a SIGKILL (or the OOM killer) closes the pipe without it. The first report creates
    RUN/FAILED, so ranks the launcher kills afterwards stay silent.
    """
    import atexit
    import platform
    import subprocess

    read, write = os.pipe()
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/stat") as f:
            grandparent = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        grandparent = 0
    try:
        subprocess.Popen([sys.executable, "-S", "-c", _DEATH_WATCH, str(rank), str(os.getpid()), platform.node(),
                          failure_marker(os.path.abspath(run_dir)), str(parent), str(grandparent)],
                         stdin=read, start_new_session=True)
    except OSError:
        os.close(write)
        return
    finally:
        os.close(read)

    def orderly():
        try:
            os.write(write, b"ok")
            os.close(write)
        except OSError:
            pass

    global _orderly_exit, _tell_watch
    _orderly_exit = orderly
    _tell_watch = lambda what: os.write(write, what)  # noqa: E731
    atexit.register(orderly)


def mpi_init_begins() -> None:
    """Tell the watcher: an exit before ``mpi_init_done`` happened inside MPI initialisation."""
    if _tell_watch is not None:
        _tell_watch(b"i")


def mpi_init_done() -> None:
    if _tell_watch is not None:
        _tell_watch(b"r")


def report_failure(world: World | None, exc: BaseException) -> None:
    """Print the traceback on this rank, naming it, then abort the whole job."""
    rank = world.rank if world is not None else 0
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    message = f"hpcdd: rank {rank} failed with {type(exc).__name__}: {exc}"
    print(f"{message}\n{text}", file=sys.stderr, flush=True)
    if world is not None:
        world.abort(1, message)
    raise SystemExit(1)


def user_error_exit(world: World | None, message: str, collective: bool) -> None:
    """One line on stderr (from the lowest rank), exit status 2; abort if the ranks did not agree."""
    if world is None or world.size == 1 or collective:
        fail(message if world is None or world.is_root else None)
    line = f"error: rank {world.rank}: {message}"
    if said_first(world.run_dir, line):  # a rank that failed too in the moment before the abort stays silent
        print(line, file=sys.stderr, flush=True)
    world.abort(EXIT_USER_ERROR, line)


def said_first(run_dir: str | None, message: str) -> bool:
    """Record ``message`` as the run's failure; False only if another rank recorded one first."""
    if not run_dir or record_failure(run_dir, message):
        return True
    return not os.path.exists(failure_marker(run_dir))



def interrupted(world: World | None, run_dir: str | None) -> None:
    """Ctrl-C (SIGINT to mpiexec reaches every rank): one line from rank 0, exit 130."""
    message = ("hpcdd: interrupted (SIGINT); checkpoints written so far are kept"
               + (f": continue with --resume {run_dir}" if run_dir and os.path.isdir(run_dir) else ""))

    has_run = bool(run_dir) and os.path.isdir(RunLayout(run_dir).progress)
    if world is None or world.is_root:
        print(message, file=sys.stderr, flush=True)  # first: the others abort once RUN/FAILED exists
        if has_run:
            record_failure(run_dir, message)
    else:
        # rank 0 says it and ends every rank; only if it has not within a few seconds (the signal
        # missed it, or it is deep in a C call) does this rank
        import time

        time.sleep(3.0)
        if has_run and record_failure(run_dir, message):
            print(message, file=sys.stderr, flush=True)
    if world is not None and world.size > 1:
        orderly_exit()
        abort_every_rank(world.comm, 130)  # a rank the signal missed must not wait in a collective
    raise SystemExit(130)


# Seconds between this rank's last output and MPI_Abort: MPICH's launcher drops what a rank wrote just
# before it aborted (13 of 40 one-line messages lost with no pause; none of 80 with 0.05 s, measured)
OUTPUT_GRACE = 0.5


def abort_every_rank(comm, code: int) -> None:
    """MPI_Abort after this rank's output reached the launcher, so the one line that says why is seen."""
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(OUTPUT_GRACE)
    comm.Abort(code)


def orderly_exit() -> None:
    """Tell this rank's watcher that the exit is deliberate."""
    if _orderly_exit is not None:
        _orderly_exit()


def record_failure(run_dir: str, message: str) -> bool:
    """Create RUN/FAILED with ``message`` unless a failure was recorded already (the first cause wins;
    True if this call recorded it). On a full disk the space RUN/.reserve holds is given up for it."""
    if not os.path.isdir(run_dir):
        return False
    try:
        fd = os.open(failure_marker(run_dir), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except OSError:
        return False
    data = (message + "\n").encode()
    try:
        for attempt in range(2):
            try:
                os.write(fd, data)
                break
            except OSError:
                if attempt == 0:
                    _give_up_reserve(run_dir)
    finally:
        os.close(fd)
    return True


def _give_up_reserve(run_dir: str) -> None:
    try:
        os.unlink(RunLayout(run_dir).reserve)
    except OSError:
        pass
