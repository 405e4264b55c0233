"""Faults of the machine a run cannot fix itself (a full disk), told apart from bugs; and inputs
that name nothing on this machine (a hub id given for a local folder), told plainly.

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


def _looks_like_hub_id(text: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text))


def missing_folder(path: str | Path, *, what: str) -> FileNotFoundError:
    """A :class:`FileNotFoundError` for a folder that does not exist; a name shaped like a Hugging
    Face hub id (``Qwen/Qwen2.5-0.5B-Instruct``) is told that jkd reads local folders only."""
    text = str(path)
    if not Path(path).exists() and _looks_like_hub_id(text):
        return FileNotFoundError(
            f"{what} {text}: no such folder. jkd reads local Hugging Face folders and never downloads; "
            f"{text!r} looks like a hub model id: download it first (`huggingface-cli download {text} --local-dir "
            f"models/{text.split('/')[-1]}`) and give that folder."
        )
    return FileNotFoundError(f"{what} {text}: no such folder.")
