"""The optional extras (tensorboard, tqdm, matplotlib): one that is not installed is simply not used;
one that is installed but fails to import (e.g. a protobuf version mismatch under tensorboard) costs
one warning line, never the run, and the report lists what it skipped."""

from __future__ import annotations

import sys

_SKIPPED: dict[str, str] = {}


def load(extra: str, importer):
    """``importer()``'s result, or None when the extra ``extra`` is missing or broken (warned once)."""
    try:
        return importer()
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == extra:
            return None  # not installed: the documented way to go without it
        return _broken(extra, e)
    except Exception as e:  # noqa: BLE001 - anything an installed package's import raises
        return _broken(extra, e)


def _broken(extra: str, e: BaseException):
    if extra not in _SKIPPED:
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}".rstrip(": ")
        _SKIPPED[extra] = why
        print(f"warning: optional extra {extra} is installed but fails to import ({why}); going on without it",
              file=sys.stderr, flush=True)
    return None


def skipped() -> dict[str, str]:
    """Extras this process skipped because they failed to import: name -> the error."""
    return dict(_SKIPPED)
