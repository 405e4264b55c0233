"""One run folder: its config guard, its "started" mark, its log, and a full disk told plainly.

The rule, the same for every command that writes a run folder (``jkd demo``, ``run``,
``train-teacher``, ``distill``, ``--auto``, sweeps):

* a new or empty folder is claimed;
* a folder whose run never started training (it failed on bad input before its first step)
  is claimed again, its old ``config.json`` replaced: a fixed command is never refused;
* a started run with the *same* configuration continues with ``resume=True`` (and is
  refused without it, so that a run is never extended by accident);
* a started run with *another* configuration is refused, naming the keys that differ, so
  old results are never reported as new ones; ``force=True`` (``--force``) deletes it and
  starts afresh, or choose another folder;
* a non-empty folder without ``config.json`` is not a run folder and is never touched.

``config.json`` is written only by :meth:`RunFolder.begin`, after the caller has checked its
inputs; :meth:`RunFolder.mark_started` marks the first training step.

One run at a time: the writer holds the folder's lock (:mod:`jkd.runtime.run_lock`) from the claim to
:meth:`RunFolder.close`; a second run on a folder in use is refused, naming the process and host
that hold it. Settings that only decide what is measured (``reusable`` keys: a test file, how many
tokens to generate) may change on ``resume=True`` without starting over: the trained models are
reused and measured again, and ``config.json`` records the new values.

In a run of several processes (:mod:`jkd.runtime.hosts`) every process checks the rule, and only the
*writer* (process 0) locks, deletes, writes the config, the mark, the log and TensorBoard events.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from jkd.runtime.atomic import atomic_write
from jkd.runtime.faults import disk_full, is_disk_full
from jkd.runtime.fingerprint import input_fingerprint
from jkd.runtime.run_lock import LOCK_FILE, RunLock

CONFIG_FILE = "config.json"
STARTED_FILE = ".started"
LOG_FILE = "log.jsonl"


def config_to_json(cfg) -> dict:
    """A config dataclass (nested dataclasses, tuples, callables) as JSON, for the guard."""

    def enc(x):
        if dataclasses.is_dataclass(x):
            return {"__type__": type(x).__name__, **{f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        if isinstance(x, (list, tuple)):
            return [enc(v) for v in x]
        if callable(x):
            return getattr(x, "__name__", repr(x))
        return x

    return enc(cfg)


def guarded_config(cfg, inputs: dict[str, str | Path | None] = {}) -> dict:  # noqa: B006 - read only
    """``cfg`` as the guard compares it: its fields (:func:`config_to_json`) and, under
    ``file_digests``, the fingerprints of the files and folders it reads by path (``inputs``: name
    -> path; those that name nothing here, a TFDS name or a missing file, are left out), so that an
    input edited or replaced in place is another configuration (:mod:`jkd.runtime.fingerprint`)."""
    digests = {k: fp for k, p in inputs.items() if (fp := input_fingerprint(p)) is not None}
    return {**config_to_json(cfg), **({"file_digests": digests} if digests else {})}


class ConfigMismatchError(ValueError):
    """A started run folder holds another configuration than the one given; ``diff`` lists the
    differing keys as ``(dotted key, old value, new value)`` (JSON values)."""

    def __init__(self, path: Path, diff: list[tuple[str, Any, Any]]):
        super().__init__(mismatch_message(path, diff))
        self.path, self.diff = Path(path), list(diff)


def config_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for each key whose value differs between two JSON
    configurations (``_ABSENT`` for a key on one side only)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old and new[k] is None:
                continue  # a field added since, at its default: the same run
            if k not in old or k not in new:
                out.append((key, old.get(k, _ABSENT), new.get(k, _ABSENT)))
            else:
                out.extend(config_changes(old[k], new[k], key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in config_changes(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [(prefix or "(config)", old, new)]


_ABSENT = "(absent)"


def _shown(value: Any) -> str:
    return _ABSENT if value is _ABSENT else json.dumps(value)


def _lines(changes: list[tuple[str, Any, Any]]) -> list[str]:
    return [f"{k}: {_shown(a)} -> {_shown(b)}" for k, a, b in changes]


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON configurations, ``key: old -> new``."""
    return _lines(config_changes(old, new, prefix))


def mismatch_message(path: Path, changes: list[tuple[str, Any, Any]], flags: dict[str, str] | None = None) -> str:
    """The refusal of a started run with another configuration, naming each changed key (and its
    command-line flag, where ``flags`` maps top-level keys to one); a changed input file or folder
    (``file_digests``) is said in words."""
    flags = flags or {}
    parts = []
    for key, old, new in changes:
        top = key.split(".")[0].split("[")[0]
        if top == "file_digests" and "." in key:
            name = key.split(".", 1)[1]
            parts.append(
                f"{name}{f' ({flags[name]})' if name in flags else ''}: its contents changed "
                f"(fingerprint {_shown(old)} -> {_shown(new)})"
            )
        else:
            parts.append(f"{key}{f' ({flags[top]})' if top in flags else ''}: {_shown(old)} -> {_shown(new)}")
    text = "; ".join(parts[:8]) + (f"; (+{len(parts) - 8} more)" if len(parts) > 8 else "")
    return (
        f"{path} holds a run with another configuration ({text}). Its results would not be this "
        "configuration's: choose another --run-dir, or pass --force to delete that run and start this one."
    )


def _started(path: Path) -> bool:
    """Training began here, or in a run folder just below (``--auto``'s search). Folders
    written before the mark existed count as started once they hold a checkpoint folder."""
    return (path / STARTED_FILE).exists() or any(path.glob(f"*/{STARTED_FILE}")) or any(path.glob("**/ckpt"))


def _matches(key: str, names: tuple[str, ...]) -> bool:
    """Whether a dotted key is one of ``names`` or lies below one (``file_digests.test_file``)."""
    key = key.split("[")[0]
    return any(key == n or key.startswith(n + ".") for n in names)


def _entries(path: Path) -> list[Path]:
    """What a folder holds besides a lock file."""
    return [p for p in path.iterdir() if p.name != LOCK_FILE]


class RunFolder:
    """A claimed run folder (see the module docstring for the rule).

    ``reusable``: top-level config keys that only decide what is measured; they may change on
    ``resume=True`` (listed in :attr:`changed`), never starting the training over. Call
    :meth:`close` when done (it releases the lock), also on failure.
    """

    def __init__(
        self,
        path: str | Path,
        config: dict,
        *,
        resume: bool = False,
        force: bool = False,
        writer: bool = True,
        reusable: tuple[str, ...] = (),
        echo=print,
    ):
        self.path = Path(path)
        self.writer = writer
        self.config = config = json.loads(json.dumps(config))  # tuples -> lists, as read back
        self.changed: list[str] = []
        self._log_file = None
        self._tb: dict[str, Any] = {}
        cfg_path = self.path / CONFIG_FILE
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} is a file; --run-dir must be a folder.")
        if self.path.is_dir() and _entries(self.path) and not cfg_path.exists():
            raise FileExistsError(
                f"{self.path} exists and is not a jkd run folder (no {CONFIG_FILE}); choose another --run-dir."
            )
        self._lock = RunLock(self.path, echo=echo) if writer else None
        if self._lock is not None:
            try:
                self._lock.acquire()
            except OSError as e:
                if isinstance(e, FileExistsError):
                    raise
                raise self._os_error(e, "creating the run folder") from e
        try:
            if cfg_path.exists() and _started(self.path):
                self._guard(json.loads(cfg_path.read_text()), resume=resume, force=force, reusable=reusable)
        except BaseException:
            self.close()
            raise

    def _guard(self, old: dict, *, resume: bool, force: bool, reusable: tuple[str, ...]) -> None:
        changes = config_changes(old, self.config)
        kept = [c for c in changes if not _matches(c[0], reusable)]
        if force:
            if self.writer:  # the others wait at the caller's barrier; the lock file stays
                for p in _entries(self.path):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif kept:
            raise ConfigMismatchError(self.path, kept)
        elif not resume:
            raise FileExistsError(
                f"{self.path} holds a run already; pass --resume to continue it, "
                "--force to start it again, or choose another --run-dir."
            )
        else:
            self.changed = _lines(changes)

    # ---- writing --------------------------------------------------------------------------

    def begin(self) -> None:
        """Write ``config.json`` (call once the inputs are checked); creates the folder."""
        if not self.writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._os_error(e, "creating the run folder") from e
        atomic_write(self.path / CONFIG_FILE, json.dumps(self.config, indent=2))

    def mark_started(self) -> None:
        """Training is about to change the folder: from now on the config guard applies."""
        if self.writer and not (self.path / STARTED_FILE).exists():
            atomic_write(self.path / STARTED_FILE, time.strftime("%Y-%m-%dT%H:%M:%S\n"))

    def _os_error(self, e: OSError, what: str) -> OSError:
        if is_disk_full(e):
            return disk_full(self.path, what=what)
        if isinstance(e, PermissionError):
            return PermissionError(
                e.errno,
                f"cannot write {what} in {self.path}: permission denied "
                "(the folder or a parent is read-only); choose another --run-dir.",
            )
        return e

    def log(self, model: str, record: dict) -> None:
        """Append ``record`` to ``log.jsonl`` and its numbers to TensorBoard (synchronously:
        a full disk raises here, in the caller's thread, and never hangs a writer thread)."""
        if not self.writer:
            return
        try:
            if self._log_file is None:
                self._log_file = (self.path / LOG_FILE).open("a")
            self._log_file.write(json.dumps({"model": model, **record}) + "\n")
            self._log_file.flush()
            writer = self._tb.get(model)
            if writer is None:
                writer = self._tb[model] = _EventWriter(self.path / "tb" / slug(model))
            writer.scalars(record)
        except OSError as e:
            raise self._os_error(e, "writing the log") from e

    def close(self) -> None:
        """Close the log and release the folder's lock; errors on the way out (a full disk
        again) do not hide the first one. Idempotent."""
        for f in [self._log_file, *self._tb.values()]:
            if f is None:
                continue
            try:
                f.close()
            except OSError:
                pass
        self._log_file, self._tb = None, {}
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    # ---- reading --------------------------------------------------------------------------

    def read_log(self) -> dict[str, list[dict]]:
        return read_log(self.path / LOG_FILE)


def read_log(path: Path) -> dict[str, list[dict]]:
    """Records per model from ``log.jsonl``, across resumes: the last record of each
    (event, step) wins (a resumed run repeats the steps after its last checkpoint)."""
    latest: dict[tuple, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill or a full disk
                continue
            if rec.get("event") in ("train", "eval"):
                latest[(rec["model"], rec["event"], rec["step"])] = rec
    out: dict[str, list[dict]] = {}
    for (model, _, _), rec in sorted(latest.items(), key=lambda kv: kv[0][2]):
        out.setdefault(model, []).append(rec)
    return out


def slug(name: str) -> str:
    """A folder name for a model's display name (``soft KD T=8`` -> ``soft_kd_t_8``)."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


class _EventWriter:
    """TensorBoard scalars written in the caller's thread (tensorboardX's ``SummaryWriter``
    writes from a thread whose death on a full disk left the run waiting forever)."""

    def __init__(self, directory: Path):
        from tensorboardX.event_file_writer import EventsWriter

        directory.mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(directory / "events"))

    def scalars(self, record: dict) -> None:
        from tensorboardX import summary
        from tensorboardX.proto import event_pb2

        event_name = record.get("event", "x")
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                self._writer.write_event(
                    event_pb2.Event(
                        wall_time=time.time(), step=int(record["step"]), summary=summary.scalar(f"{event_name}/{k}", v)
                    )
                )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
