"""The one way jkd writes a file that must never be seen half-written: a temporary name beside it,
flushed to disk, then renamed over it. A kill leaves the old file or the new one, never a mix; a
full disk is reported as :class:`jkd.runtime.faults.DiskFullError` naming the file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

from jkd.runtime.faults import disk_full, is_disk_full


def atomic_write(path: str | Path, data: str | bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (text as UTF-8, bytes, or a function that writes to the open binary file,
    e.g. ``lambda f: np.savez(f, ...)``) to ``path`` atomically; returns ``path``. The temporary
    file is named for this process (``<name>.tmp-<pid>``), so two writers never share one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and is_disk_full(e):
            raise disk_full(path.parent, what=f"writing {path.name}") from e
        raise
    return path
