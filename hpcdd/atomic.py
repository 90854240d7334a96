"""Atomic files: write to a temporary name in the same directory, fsync, rename into place.

A crash at any point leaves either the previous file or the new one, never a torn one.
Checkpoints hold plain dicts, tensors, numbers and strings, so ``torch.load(weights_only=True)``
reads them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile

from .errors import UserError


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DiskFull(UserError):
    """No space (or quota) left: one line naming the file; what was written before stays usable."""


def disk_full(path: str, e: OSError) -> DiskFull | None:
    """The one-line error for a write into ``path`` that failed with ``e``, if the disk is full."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return DiskFull(f"{path}: no space left on its file system ({e.strerror}); earlier checkpoints are intact: "
                    f"free space, then continue with --resume")


def _atomic_write(path: str, write) -> None:
    try:
        _write_renamed(path, write)
    except OSError as e:
        full = disk_full(path, e)
        if full is not None:
            raise full from None
        raise


def _write_renamed(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save(obj, path: str) -> None:
    import torch

    buffer = io.BytesIO()  # serialised first: a full disk is then a plain OSError of our own write
    torch.save(obj, buffer)
    _atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load(path: str, map_location="cpu"):
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: missing checkpoint") from None
    except Exception as e:  # torch raises many types for torn or foreign files
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def save_npz(path: str, **arrays) -> None:
    import numpy as np

    _atomic_write(path, lambda f: np.savez(f, **arrays))


def write_json(obj, path: str) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()))


def write_text(text: str, path: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str, missing: str = "missing"):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt JSON ({e})") from None
