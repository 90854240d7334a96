"""Command-line helpers shared by the entry points: argparse that fails in one line."""

from __future__ import annotations

import argparse

from .errors import UserError, fail
from .parallel.launcher import world_info


def count(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (--batch-size 0 and --threads -1 fail at parse)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: expected {'a positive integer' if minimum == 1 else f'an integer >= {minimum}'}")
        return value
    parse.__name__ = "integer"
    return parse


def writable_file(option: str, path: str) -> None:
    """An output file's folder must exist and be writable, checked before any work."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{option} {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{option} {path}: is a directory; expected a file name")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{option} {path}: folder {folder} is not writable")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) with exit status 2."""

    def error(self, message: str):
        """Every rank of a launcher parses the same arguments and fails the same way: rank 0 says it."""
        import os

        fail(f"{self.prog}: {message} (see --help)" if world_info(os.environ).rank == 0 else None)
