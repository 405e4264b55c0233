"""Training one group in a run folder: a teacher, or several students in one vmapped state."""

from __future__ import annotations

from typing import Callable, Iterator

from jkd.runtime.run_folder import RunFolder, slug
from jkd.train.checkpoint import Checkpoints
from jkd.train.loop import LoopConfig, fit


def train_group(
    folder: RunFolder,
    name: str,
    run: Callable,
    state,
    objective,
    teacher,
    *,
    batches: Callable[[int], Iterator[dict]],
    config: LoopConfig,
    evaluate: Callable[[object], dict] | None = None,
    annotate: Callable[[dict], dict] | None = None,
    echo: Callable[[str], None] = print,
):
    """Train ``state`` with ``run`` (:mod:`jkd.train.parallel`) for ``config.num_steps`` steps as
    the group ``name`` of ``folder``, and return the final state.

    The folder is marked started (its config guard applies from here on); the group's checkpoints
    live in ``<folder>/<slug(name)>/ckpt`` and a rerun resumes from the newest readable one (the
    console says from which step). Every record of :func:`jkd.train.loop.fit` (``annotate``\\ d,
    e.g. with the epoch) goes to the folder's log under ``name``.
    """

    def log(record: dict) -> None:
        record = annotate(record) if annotate is not None else record
        folder.log(name, record)
        if record.get("event") == "resumed":
            echo(f"{name}: resumed from the checkpoint of step {record['step']}")

    folder.mark_started()
    checkpoints = Checkpoints(folder.path / slug(name) / "ckpt")
    try:
        state, _ = fit(
            run,
            state,
            objective,
            teacher,
            batches=batches,
            checkpoints=checkpoints,
            evaluate=evaluate,
            log=log,
            config=config,
        )
    finally:
        checkpoints.close()
    return state
