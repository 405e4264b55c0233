"""The one evaluation loop: a model's logits over every example of a split, padding dropped.

``jkd evaluate``, the run's periodic and final evaluations and ``jkd compress`` all call
:func:`predict`; what they compute from the logits (accuracy, loss, reports) is numpy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jkd.data import pipeline as P


def predict(
    fn: Callable[[dict], object], source, *, batch_size: int, split: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [..., N, C], labels [N])`` of ``fn`` on every example of ``source``.

    Args:
      fn: ``fn(batch) -> logits [..., B, C]`` for an eval batch ``{"image", "label", "mask"}``
        (a leading axis, e.g. K students, is kept).
      source: a random-access split (``pipeline.reader(...)``, a ``Subset``).
      batch_size: rows per call; the last batch is padded and its padding dropped here.
      split: in a run of several processes (:mod:`jkd.runtime.hosts`), each evaluates its contiguous
        share of ``source`` and the shares are gathered, so every process returns the whole
        split's logits, computed once. ``fn`` must then be a local computation (variables from
        :func:`jkd.runtime.hosts.local`). A collective: every process calls it.
    """
    from jkd.runtime import hosts

    count = hosts.process_count() if split else 1
    if count > 1:
        if len(source) < count:
            raise ValueError(f"{len(source)} examples cannot be shared by {count} processes; evaluate on one.")
        parts = hosts.shares(len(source), count)
        sizes = [len(s) for s in parts]
        logits, labels = predict(fn, P.Subset(source, parts[hosts.process_index()]), batch_size=batch_size)
        return hosts.allgather_rows(logits, axis=-2, sizes=sizes), hosts.allgather_rows(labels, axis=0, sizes=sizes)
    logits, labels = [], []
    for b in P.eval_batches(source, batch_size=batch_size):
        mask = np.asarray(b["mask"])
        logits.append(np.asarray(fn(b))[..., mask, :])
        labels.append(np.asarray(b["label"])[mask])
    return np.concatenate(logits, axis=-2), np.concatenate(labels)


def accuracy_and_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 accuracy and mean cross-entropy over the examples axis (``[..., N, C]`` -> ``[...]``)."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_p, np.broadcast_to(labels[:, None], log_p.shape[:-1] + (1,)), axis=-1)[..., 0]
    return (logits.argmax(-1) == labels).mean(-1), -picked.mean(-1)
