"""Command-line helpers shared by the entry points: argparse that fails in one line."""

from __future__ import annotations

import argparse
import sys

from .errors import EXIT_USER_ERROR


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) with exit status 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)
