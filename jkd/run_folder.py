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

In a run of several processes (:mod:`jkd.hosts`) every process checks the rule, and only the
*writer* (process 0) deletes, writes the config, the mark, the log and TensorBoard events.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from jkd.faults import disk_full, is_disk_full

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


class ConfigMismatchError(ValueError):
    """A started run folder holds another configuration than the one given."""


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON configurations, ``key: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old and new[k] is None:
                continue  # a field added since, at its default: the same run
            if k not in old:
                out.append(f"{key}: (absent) -> {json.dumps(new[k])}")
            elif k not in new:
                out.append(f"{key}: {json.dumps(old[k])} -> (absent)")
            else:
                out.extend(config_diff(old[k], new[k], key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in config_diff(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [f"{prefix or '(config)'}: {json.dumps(old)} -> {json.dumps(new)}"]


def _started(path: Path) -> bool:
    """Training began here, or in a run folder just below (``--auto``'s search). Folders
    written before the mark existed count as started once they hold a checkpoint folder."""
    return ((path / STARTED_FILE).exists() or any(path.glob(f"*/{STARTED_FILE}"))
            or any(path.glob("**/ckpt")))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path.parent, what=f"writing {path.name}") from e
        raise


class RunFolder:
    """A claimed run folder (see the module docstring for the rule)."""

    def __init__(self, path: str | Path, config: dict, *, resume: bool = False, force: bool = False,
                 writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.config = config = json.loads(json.dumps(config))  # tuples -> lists, as read back
        cfg_path = self.path / CONFIG_FILE
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} is a file; --run-dir must be a folder.")
        if self.path.is_dir() and any(self.path.iterdir()):
            if not cfg_path.exists():
                raise FileExistsError(f"{self.path} exists and is not a jkd run folder (no {CONFIG_FILE}); "
                                      "choose another --run-dir.")
            if _started(self.path):
                old = json.loads(cfg_path.read_text())
                diff = config_diff(old, config)
                if force:
                    if writer:  # the others wait at the caller's barrier
                        shutil.rmtree(self.path)
                elif diff:
                    shown = "; ".join(diff[:8]) + (f"; (+{len(diff) - 8} more)" if len(diff) > 8 else "")
                    raise ConfigMismatchError(
                        f"{self.path} holds a run with another configuration ({shown}). Its results "
                        "would not be this configuration's: choose another --run-dir, or pass --force "
                        "to delete that run and start this one.")
                elif not resume:
                    raise FileExistsError(f"{self.path} holds a run already; pass --resume to continue it, "
                                          "--force to start it again, or choose another --run-dir.")
        self._log_file = None
        self._tb: dict[str, Any] = {}

    # ---- writing --------------------------------------------------------------------------

    def begin(self) -> None:
        """Write ``config.json`` (call once the inputs are checked); creates the folder."""
        if not self.writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._os_error(e, "creating the run folder") from e
        _write_atomic(self.path / CONFIG_FILE, json.dumps(self.config, indent=2))

    def mark_started(self) -> None:
        """Training is about to change the folder: from now on the config guard applies."""
        if self.writer and not (self.path / STARTED_FILE).exists():
            _write_atomic(self.path / STARTED_FILE, time.strftime("%Y-%m-%dT%H:%M:%S\n"))

    def _os_error(self, e: OSError, what: str) -> OSError:
        if is_disk_full(e):
            return disk_full(self.path, what=what)
        if isinstance(e, PermissionError):
            return PermissionError(e.errno, f"cannot write {what} in {self.path}: permission denied "
                                   "(the folder or a parent is read-only); choose another --run-dir.")
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
        """Close the log; errors on the way out (a full disk again) do not hide the first one."""
        for f in [self._log_file, *self._tb.values()]:
            if f is None:
                continue
            try:
                f.close()
            except OSError:
                pass
        self._log_file, self._tb = None, {}

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
                self._writer.write_event(event_pb2.Event(
                    wall_time=time.time(), step=int(record["step"]), summary=summary.scalar(f"{event_name}/{k}", v)))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
