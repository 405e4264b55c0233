"""Where a job's teacher comes from: a folder the user gives, the one this run folder saved, or
training here (then saved once, so a rerun loads it)."""

from __future__ import annotations

from pathlib import Path

from jkd.runtime.run_folder import RunFolder

SAVED_TEACHER = Path("teacher") / "model"  # inside the run folder


def teacher_source(given: str | Path | None, folder: RunFolder, *, complete: str | None = None) -> Path | None:
    """The folder to load the teacher from: ``given`` (``--teacher``, ``--teacher-dir``), else the
    teacher this run saved in ``<run>/teacher/model`` (once it exists, and holds ``complete`` when
    named), else None: the job trains it and saves it there."""
    if given is not None:
        return Path(given)
    saved = folder.path / SAVED_TEACHER
    done = saved / complete if complete else saved
    return saved if done.exists() else None
