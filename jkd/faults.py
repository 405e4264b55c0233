"""Faults of the machine a run cannot fix itself (a full disk), told apart from bugs.

Bottom floor: imports nothing of jkd. The CLI prints these as one line with exit 2; the
fit loop and the run folder raise them with where it happened and what is needed.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

_DISK_FULL_MARKS = ("No space left on device", "RESOURCE_EXHAUSTED", "ENOSPC", "Disk quota exceeded")


class DiskFullError(OSError):
    """A write failed because the disk (or quota) is full. Saved progress is intact."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk.

    orbax reports a full disk as ``ValueError('RESOURCE_EXHAUSTED: ...')`` from its writer
    threads; Python's own writes raise ``OSError`` with ``errno.ENOSPC``.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(mark in str(exc) for mark in _DISK_FULL_MARKS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def disk_full(path: str | Path, *, what: str, need_bytes: int | None = None) -> DiskFullError:
    """A :class:`DiskFullError` naming the folder, the free space and, if known, the need."""
    path = Path(path)
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    need = f"; this run needs about {_mb(need_bytes)} there" if need_bytes else ""
    return DiskFullError(
        errno.ENOSPC,
        f"disk full while {what} in {path} ({_mb(free)} free{need}). Saved progress up to the "
        "last complete checkpoint is intact: free some space (or choose another --run-dir) and "
        "rerun the same command with --resume.",
    )
