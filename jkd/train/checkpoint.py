"""Checkpoints (orbax): the student's train state every N steps, the latest and the best kept.

* Saves are asynchronous; every save goes to a new step folder, written to a temporary
  name and renamed when complete (orbax's atomic finalisation), so nothing is overwritten in
  place and a kill mid-save leaves only an unfinished temporary folder, which is ignored.
* Kept: the two latest steps (resume, and a fallback should the newest be corrupt) and the
  best by validation accuracy (orbax ``AnyPreservationPolicy([LatestN(2), BestN(1)])``;
  ``max_to_keep`` with ``best_fn`` could delete the latest). The best step is read from the
  steps' own metadata.
* Restore tries the newest step first; one that cannot be read (corrupt, truncated) is
  reported with a warning and the previous one is used.
* The teacher is saved once, apart (:func:`save_frozen`), never inside the student's steps.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

BEST_METRIC = "val_accuracy"


def abstract_like(tree, sharding=None):
    """``ShapeDtypeStruct``s of ``tree`` (placed with ``sharding`` if given): the restore target.

    Restoring into a different device count: pass the new mesh's replicated sharding.
    """
    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class Checkpoints:
    """The student's checkpoints in ``directory`` (one sub-folder per step)."""

    def __init__(self, directory: str | Path, *, keep_latest: int = 2, async_save: bool = True):
        if keep_latest < 1:
            raise ValueError(f"keep_latest must be >= 1; got {keep_latest}.")
        self.directory = Path(directory).absolute()
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(n=keep_latest),
            cm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, *, meta: dict[str, Any]) -> None:
        """Start saving ``state`` at ``step`` (async). ``meta`` is JSON (data position, metrics);
        a ``val_accuracy`` entry makes the step a candidate for "best"."""
        metrics = {BEST_METRIC: float(meta[BEST_METRIC])} if BEST_METRIC in meta else None
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        """Finalised steps, oldest first (unfinished temporary folders are not steps)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def best_step(self) -> int | None:
        """The kept step with the highest validation accuracy, if any step has one."""
        scored = []
        for s in self.steps():
            try:
                m = self.meta(s)
            except Exception:  # noqa: BLE001 - an unreadable step cannot be best
                continue
            if BEST_METRIC in m:
                scored.append((m[BEST_METRIC], s))
        return max(scored)[1] if scored else None

    def restore(self, abstract_state, step: int | None = None):
        """``(state, meta)`` of ``step`` or of the newest readable step; ``None`` if none.

        A step that fails to restore is skipped with a warning (falls back to the previous).
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        for s in candidates:
            try:
                out = self._manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                if step is not None:
                    raise
                warnings.warn(
                    f"checkpoint step {s} in {self.directory} could not be restored "
                    f"({type(e).__name__}: {str(e)[:200]}); falling back to an earlier step.",
                    RuntimeWarning, stacklevel=2,
                )
                continue
            return out["state"], out["meta"]
        return None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_frozen(directory: str | Path, variables, meta: dict[str, Any]) -> None:
    """Save frozen model variables (the teacher) once, synchronously, to ``directory``."""
    path = Path(directory).absolute()
    if path.exists():
        raise FileExistsError(f"{path} exists; a frozen model is written once and never overwritten.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(path, args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)))


def load_frozen(directory: str | Path, abstract_variables):
    """``(variables, meta)`` saved by :func:`save_frozen`."""
    path = Path(directory).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no saved model at {path}.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        out = ckpt.restore(path, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(abstract_variables), meta=ocp.args.JsonRestore()))
    return out["variables"], out["meta"]
