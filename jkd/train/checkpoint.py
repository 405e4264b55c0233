"""Checkpoints (orbax): the student's train state every N steps, the latest ones kept.

* Saves are asynchronous; every save goes to a new step folder, written to a temporary
  name and renamed when complete (orbax's atomic finalisation), so nothing is overwritten in
  place and a kill mid-save leaves only an unfinished temporary folder, which is ignored.
* Kept: the two latest steps (resume, and a fallback should the newest be corrupt). No "best"
  step is kept: nothing restores one (the run's models are its last steps), so it only cost
  disk; choosing a step on validation data would be early stopping, a feature of its own.
* Restore tries the newest step first. A step that cannot be read (corrupt, truncated) is
  set aside into ``<directory>_unreadable/<step>`` (kept for inspection), reported with a
  warning, and the previous one is used; training then writes that step afresh. A step that
  reads fine but holds another model (names or shapes differ from the state asked for) is
  not corruption: it raises :class:`IncompatibleCheckpointError` naming both, and nothing is
  moved.
* A full disk while saving raises :class:`jkd.runtime.faults.DiskFullError` (orbax's writer threads
  report it as ``RESOURCE_EXHAUSTED``); the unfinished step is a temporary folder that the
  next run removes, so the newest complete step stays the one to resume from.
* The teacher is saved once, apart (:func:`save_frozen`), never inside the student's steps.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jkd.runtime.faults import disk_full, is_disk_full


class IncompatibleCheckpointError(ValueError):
    """A checkpoint that reads fine but holds another model or optimizer than the one asked for."""


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _expected_shapes(abstract_state) -> dict[str, tuple | None]:
    """Leaf name -> shape, as orbax names leaves; PRNG keys (stored as raw data) -> None."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
    return {_leaf_name(p): (None if _is_key(x) else tuple(x.shape)) for p, x in flat}


def _saved_shapes(tree_metadata) -> dict[str, tuple]:
    leaves = jax.tree.leaves(tree_metadata, is_leaf=lambda x: hasattr(x, "name") and hasattr(x, "shape"))
    return {x.name: tuple(x.shape) for x in leaves if hasattr(x, "name") and hasattr(x, "shape")}


def compatibility_problems(saved: dict[str, tuple], expected: dict[str, tuple | None], limit: int = 4) -> list[str]:
    """What differs between a checkpoint's arrays and the state asked for (empty: compatible)."""
    problems = []
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing:
        problems.append(
            f"arrays the config needs but the checkpoint lacks: {missing[:limit]}"
            + (f" (+{len(missing) - limit} more)" if len(missing) > limit else "")
        )
    if extra:
        problems.append(
            f"arrays the checkpoint holds but the config does not: {extra[:limit]}"
            + (f" (+{len(extra) - limit} more)" if len(extra) > limit else "")
        )
    params_first = sorted(set(saved) & set(expected), key=lambda k: (not k.startswith("params."), k))
    shapes = [
        f"{k}: saved {saved[k]}, config {expected[k]}"
        for k in params_first
        if expected[k] is not None and saved[k] != expected[k]
    ]
    if shapes:
        problems.append(
            "shapes differ: "
            + "; ".join(shapes[:limit])
            + (f" (+{len(shapes) - limit} more)" if len(shapes) > limit else "")
        )
    return problems


def state_bytes(tree) -> int:
    """Bytes of the arrays in ``tree`` (what one checkpoint of it takes, uncompressed)."""
    return int(
        sum(
            np.prod(x.shape) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(tree)
            if hasattr(x, "shape") and not _is_key(x)
        )
    )


def abstract_like(tree, sharding=None):
    """``ShapeDtypeStruct``s of ``tree`` (placed with ``sharding`` if given): the restore target.

    Restoring into a different device count: pass the new mesh's replicated sharding, or a
    function ``tree -> tree of shardings`` (a model sharded over a mesh).
    """

    def one(x, sharding):
        return jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=sharding if sharding is not None else getattr(x, "sharding", None)
        )

    if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(one, tree, sharding(tree))
    return jax.tree.map(lambda x: one(x, sharding), tree)


class Checkpoints:
    """The student's checkpoints in ``directory`` (one sub-folder per step)."""

    def __init__(self, directory: str | Path, *, keep_latest: int = 2, async_save: bool = True):
        if keep_latest < 1:
            raise ValueError(f"keep_latest must be >= 1; got {keep_latest}.")
        self.directory = Path(directory).absolute()
        policy = cm.LatestN(n=keep_latest)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.keep_latest = keep_latest
        self._need_bytes = None
        try:
            # Handlers named up front, so that a fresh process can read a step's metadata
            # (the compatibility check) before restoring anything.
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            )
        except Exception as e:
            if is_disk_full(e):
                raise disk_full(self.directory, what="creating the checkpoint folder") from e
            raise

    @property
    def unreadable_directory(self) -> Path:
        """Where unreadable steps are set aside (kept for inspection, never read again)."""
        return self.directory.with_name(self.directory.name + "_unreadable")

    def _disk_full(self, e: BaseException, what: str):
        if is_disk_full(e):
            return disk_full(self.directory, what=what, need_bytes=self._need_bytes)
        return None

    def save(self, step: int, state, *, meta: dict[str, Any]) -> None:
        """Start saving ``state`` at ``step`` (async). ``meta`` is JSON (data position, metrics)."""
        # The kept steps, one being written and the one being replaced.
        self._need_bytes = state_bytes(state) * (self.keep_latest + 2)
        try:
            self._manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:
            full = self._disk_full(e, f"saving checkpoints (step {step} or the one before)")
            if full is not None:
                raise full from e
            raise

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            full = self._disk_full(e, "saving a checkpoint")
            if full is not None:
                raise full from e
            raise

    def steps(self) -> list[int]:
        """Finalised steps, oldest first (unfinished temporary folders are not steps)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, abstract_state) -> None:
        """Raise :class:`IncompatibleCheckpointError` if ``step`` holds other arrays than
        ``abstract_state`` (names or shapes). Unreadable metadata raises whatever orbax raises."""
        saved = _saved_shapes(self._manager.item_metadata(step)["state"].tree)
        problems = compatibility_problems(saved, _expected_shapes(abstract_state))
        if problems:
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.directory} holds another model or optimizer than "
                f"this configuration builds ({'; '.join(problems)}). Was the model or the optimizer "
                "changed? Use another --run-dir for the new configuration."
            )

    def _set_aside(self, step: int) -> Path:
        if jax.process_index() != 0:
            # Several processes share the folder: process 0 moves the step (each process found it
            # unreadable and falls back the same way); a second move would race with it.
            return self.unreadable_directory / str(step)
        target = self.unreadable_directory / str(step)
        n = 1
        while target.exists():
            n += 1
            target = self.unreadable_directory / f"{step}.{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
        self._manager.reload()
        return target

    def restore(self, abstract_state, step: int | None = None):
        """``(state, meta)`` of ``step`` or of the newest readable step; ``None`` if none.

        Without ``step``: a step that cannot be read is set aside (see the module docstring)
        with a warning, and the previous one is tried. A step holding another model raises
        :class:`IncompatibleCheckpointError`, whichever step was asked for.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        for s in candidates:
            try:
                self.check_compatible(s, abstract_state)
                out = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is set aside
                if step is not None:
                    raise
                where = self._set_aside(s)
                warnings.warn(
                    f"checkpoint step {s} in {self.directory} could not be restored "
                    f"({type(e).__name__}: {str(e)[:200]}); moved to {where} for inspection, "
                    "falling back to an earlier step.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            return out["state"], out["meta"]
        return None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def save_frozen(directory: str | Path, variables, meta: dict[str, Any]) -> None:
    """Save frozen model variables (the teacher) once, synchronously, to ``directory``.

    In a run of several processes every process calls it with the same variables; they are
    replicated over all devices first, so orbax writes each array once (not once per host)."""
    path = Path(directory).absolute()
    if path.exists():
        raise FileExistsError(f"{path} exists; a frozen model is written once and never overwritten.")
    if jax.process_count() > 1:
        from jkd.train import parallel

        variables = parallel.replicated(variables, parallel.data_mesh())
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(
            path, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta))
        )


def load_frozen(directory: str | Path, abstract_variables):
    """``(variables, meta)`` saved by :func:`save_frozen`."""
    path = Path(directory).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no saved model at {path}.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        out = ckpt.restore(
            path,
            args=ocp.args.Composite(
                variables=ocp.args.StandardRestore(abstract_variables), meta=ocp.args.JsonRestore()
            ),
        )
    return out["variables"], out["meta"]
