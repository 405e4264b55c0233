"""One run at a time in a run folder: a lock file that names its holder and dies with it.

``<run_dir>/.lock`` is held with ``flock`` while a command writes the folder. The kernel releases
it when the holding process ends, however it ends (``kill -9``, a crash, a reboot), so a lock
never outlives its process on the same host. The file also records who holds it (host, process
id, command, start time), for two purposes:

* a second run on the folder is refused with that holder named;
* a lock file whose holder is gone (the file is still there, but nobody holds it) is taken over
  with a line that says so.

On a filesystem shared by several hosts, ``flock`` may not reach across machines (NFS versions,
FUSE mounts of object stores). The holder therefore refreshes the file's modification time every
:data:`HEARTBEAT_S` seconds, and a lock file written on *another* host whose heartbeat is younger
than :data:`STALE_AFTER_S` is respected even where ``flock`` succeeded. In a run of several
processes, process 0 alone takes the lock for the run.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0

_HELD: dict[Path, "RunLock"] = {}  # the locks this process holds, by folder


class RunFolderBusy(FileExistsError):
    """Another live process is running in this folder."""


def _describe(holder: dict) -> str:
    cmd = " ".join(holder.get("argv") or [])
    return (
        f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started "
        f"{holder.get('started', '?')}{f': {cmd[:120]}' if cmd else ''})"
    )


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """The lock of one run folder; :meth:`acquire` then :meth:`release` (also a context manager)."""

    def __init__(self, folder: str | Path, *, echo: Callable[[str], None] = print):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.echo = echo
        self._fd: int | None = None
        self._created_folder = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunFolderBusy` naming the live holder."""
        import fcntl

        key = self.folder.absolute()
        mine = _HELD.get(key)
        if mine is not None:  # this process took it and never let go (an exception in a notebook)
            mine.release()
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self._created_folder = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderBusy(self._busy_message(_read(self.path))) from None
            try:  # the file we locked may have been released and unlinked meanwhile: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(self.path)
        if previous:
            age = time.time() - os.fstat(fd).st_mtime
            if previous.get("host") != socket.gethostname() and age < STALE_AFTER_S:
                os.close(fd)  # a holder on another host, alive by its heartbeat
                raise RunFolderBusy(self._busy_message(previous))
            if previous.get("pid") != os.getpid() or previous.get("host") != socket.gethostname():
                self.echo(
                    f"{self.folder}: taking over the lock left by {_describe(previous)}, which is no longer running."
                )
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD[key] = self
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="jkd-run-lock", daemon=True)
        self._beat.start()

    def _busy_message(self, holder: dict) -> str:
        who = _describe(holder) if holder else "another process"
        return (
            f"{self.folder} is in use by {who}. Two runs in one folder would overwrite each other's "
            "checkpoints and log: wait for that run to end (or stop it), or choose another --run-dir."
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the folder went away (or a full disk); the flock still holds

    def release(self) -> None:
        """Let go (idempotent): the lock file is removed, and the folder too if this lock created it
        and nothing else was written there."""
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=1.0)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # unlink first: a waiting process then locks a new file, never this one
        self._fd = None
        _HELD.pop(self.folder.absolute(), None)
        if self._created_folder:
            try:
                self.folder.rmdir()  # only if empty
            except OSError:
                pass
