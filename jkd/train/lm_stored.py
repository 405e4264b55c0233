"""Deprecated: stored teacher outputs of language models live in :mod:`jkd.train.stored` (one
design for images and language models), their step in :mod:`jkd.train.lm_steps`.

Old name -> new name: ``store_topk`` -> :func:`jkd.train.stored.store_sequence_topk`;
``StoredTopK`` -> :class:`jkd.train.stored.StoredTopK` (fields ``values``, ``indices``,
``source``; batches carry ``teacher_topk_values`` / ``teacher_topk_indices``);
``StoredOutputMismatch`` -> :class:`jkd.train.stored.TeacherOutputMismatch`;
``sequence_fingerprints`` -> :func:`jkd.train.stored.fingerprints`; ``teacher_identity`` ->
:func:`jkd.train.stored.teacher_identity`; ``StoredTopKKD``, ``stored_topk_step`` ->
:mod:`jkd.train.lm_steps`.
"""

from __future__ import annotations

import importlib
import warnings

_MOVED = {
    "store_topk": ("jkd.train.stored", "store_sequence_topk"),
    "StoredTopK": ("jkd.train.stored", "StoredTopK"),
    "StoredOutputMismatch": ("jkd.train.stored", "TeacherOutputMismatch"),
    "sequence_fingerprints": ("jkd.train.stored", "fingerprints"),
    "teacher_identity": ("jkd.train.stored", "teacher_identity"),
    "with_stored_targets": ("jkd.train.stored", "with_teacher_targets"),
    "StoredTopKKD": ("jkd.train.lm_steps", "StoredTopKKD"),
    "stored_topk_step": ("jkd.train.lm_steps", "stored_topk_step"),
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'jkd.train.lm_stored' has no attribute {name!r}")
    module, new = _MOVED[name]
    warnings.warn(f"jkd.train.lm_stored.{name} is deprecated; use {module}.{new}.", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), new)
