"""Failure handling: any exception on one rank ends the whole job, and RUN/FAILED says who and why.

A rank that raises prints its traceback and aborts every rank (``MPI_Abort``); a rank killed by a
signal is named by a tiny watcher process; a user error is one line and exit status 2.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import TYPE_CHECKING

from .errors import EXIT_USER_ERROR

if TYPE_CHECKING:
    from .parallel import World

_orderly_exit = None  # tells this rank's watcher that the exit is deliberate

_DEATH_WATCH = r"""
import os, sys
rank, pid, host, marker = sys.argv[1:5]
said = sys.stdin.buffer.read()  # end of file when the rank exits, however it exits
if said.endswith(b"ok"):
    sys.exit(0)
msg = (f"hpcdd: rank {rank} (pid {pid} on {host}) died without a Python error: killed by a signal "
       f"(SIGKILL, or the out-of-memory killer); the launcher ends the other ranks")
try:
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
except FileNotFoundError:
    fd = None
except OSError:
    sys.exit(0)  # a failure was already reported (this rank was ended by the launcher's clean-up)
if fd is not None:
    os.write(fd, (msg + "\n").encode())
    os.close(fd)
print(msg, file=sys.stderr, flush=True)
"""


def failure_marker(run_dir: str) -> str:
    from .layout import RunLayout

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
    try:
        subprocess.Popen([sys.executable, "-S", "-c", _DEATH_WATCH, str(rank), str(os.getpid()), platform.node(),
                          failure_marker(os.path.abspath(run_dir))], stdin=read, start_new_session=True)
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

    global _orderly_exit
    _orderly_exit = orderly
    atexit.register(orderly)


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
        if world is None or world.is_root:
            print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)
    print(f"error: rank {world.rank}: {message}", file=sys.stderr, flush=True)
    world.abort(EXIT_USER_ERROR, f"error: rank {world.rank}: {message}")



def orderly_exit() -> None:
    """Tell this rank's watcher that the exit is deliberate."""
    if _orderly_exit is not None:
        _orderly_exit()


def record_failure(run_dir: str, message: str) -> None:
    """Create RUN/FAILED with ``message`` unless a failure was recorded already (the first cause wins)."""
    if not os.path.isdir(run_dir):
        return
    try:
        fd = os.open(failure_marker(run_dir), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.write(fd, (message + "\n").encode())
        os.close(fd)
    except OSError:
        pass
