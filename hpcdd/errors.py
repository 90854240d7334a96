"""User errors: bad input or configuration, reported as one line with exit status 2."""

import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input that the user can fix; never shown with a traceback."""


class AgreedError(UserError):
    """A UserError every rank raised together (``World.checked``): one line from rank 0, no abort."""


def fail(message: str) -> "None":
    """Print one line to stderr and exit with status 2 (for entry points without MPI)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)
