"""User errors: bad input or configuration, reported as one line with exit status 2."""

import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input that the user can fix; never shown with a traceback."""


class AgreedError(UserError):
    """A UserError every rank raised together (``World.checked``): one line from rank 0, no abort."""


def fail(message: str | None) -> "None":
    """Print one line to stderr (unless ``message`` is None: another rank says it) and exit with status 2.

    Every rank of a job may be exiting 2 together: a launcher that ends the job once its first rank exits
    non-zero (``srun --kill-on-bad-exit``) sends SIGTERM to the others while they print or finalize MPI,
    and the job's status became 143 instead of 2 (seen in CI). Past this point a rank only exits, so it
    ignores SIGTERM; SIGKILL still ends it.
    """
    import signal

    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        pass
    if message is not None:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)
