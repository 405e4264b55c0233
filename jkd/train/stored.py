"""Teacher outputs computed once and stored (opt-in, for fixed views only).

Online distillation runs the teacher's forward pass on every step; when every epoch shows the
student the *same* view of each example (no random augmentation), the teacher's outputs do not
change and can be computed once. :class:`StoredTeacher` holds, per training example, the
teacher's top-k logits in bfloat16 and their class indices, keyed by the example's id (its
index in the split) and by the view they were computed on, with a fingerprint of the image.
:func:`with_teacher_targets` attaches them to each batch after checking every row against that
fingerprint, so a shuffled or reordered dataset can never pair an image with another image's
targets. :func:`jkd.train.train_step_stored` then trains without running the teacher.

Random augmentation is refused (:func:`check_fixed_view`): under it the teacher must see the
student's view, which changes every step (big_vision's "consistent teaching").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jkd.data import pipeline as P

_MULTIPLIER = np.uint32(2654435761)  # Knuth's multiplicative hash constant


class TeacherOutputMismatch(ValueError):
    """A batch's images are not the ones the stored teacher outputs were computed on."""


def check_fixed_view(*, crop_padding: int = 0, flip: bool = False, mixup: float = 0.0) -> None:
    """Refuse random augmentation: stored teacher outputs are only valid for fixed views."""
    active = [f"{name}={value}" for name, value, on in (
        ("crop_padding", crop_padding, crop_padding > 0), ("flip", flip, bool(flip)), ("mixup", mixup, mixup > 0)) if on]
    if active:
        raise ValueError(f"stored teacher outputs need fixed views, but random augmentation is on ({', '.join(active)}); "
                         "turn it off, or distil online (the teacher then sees each step's augmented view).")


@functools.lru_cache(maxsize=8)
def _pixel_weights(n: int) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.uint32) * _MULTIPLIER  # wraps modulo 2^32, on purpose


def image_fingerprints(images: np.ndarray) -> np.ndarray:
    """``uint8 [B, ...] -> uint32 [B]``: a position-weighted hash of each image's pixels,
    modulo 2^32 (a permutation of pixels, or another image, changes it)."""
    flat = np.asarray(images).reshape(len(images), -1)
    return (flat.astype(np.uint32) * _pixel_weights(flat.shape[1])).sum(axis=1, dtype=np.uint32)


@dataclasses.dataclass(frozen=True)
class StoredTeacher:
    """The teacher's top-k outputs for examples ``0..N-1`` of one split, on one view.

    ``values``: bfloat16 ``[N, k]`` logits, largest first; ``indices``: int32 ``[N, k]``
    classes; ``fingerprints``: uint32 ``[N]`` of the images they were computed on; ``view``:
    a name for the view (e.g. its normalisation), checked where the targets are used.
    """

    values: np.ndarray
    indices: np.ndarray
    fingerprints: np.ndarray
    view: str

    def __len__(self) -> int:
        return len(self.fingerprints)

    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes + self.fingerprints.nbytes

    def targets(self, batch: dict, *, view: str) -> dict:
        """``batch`` plus ``teacher_topk_values`` / ``teacher_topk_indices`` for its rows,
        after checking the view and every row's image against the stored fingerprint."""
        if view != self.view:
            raise TeacherOutputMismatch(f"the stored teacher outputs were computed on view {self.view!r}, "
                                        f"but the step uses {view!r}; store them again for this view.")
        if "index" not in batch:
            raise ValueError("the batch carries no example ids ('index'); use jkd.data.pipeline.train_batches.")
        index = np.asarray(batch["index"])
        if index.min(initial=0) < 0 or index.max(initial=0) >= len(self):
            raise TeacherOutputMismatch(f"example ids {index.min()}..{index.max()} fall outside the {len(self)} "
                                        "stored examples; were the outputs stored for another split?")
        bad = np.flatnonzero(image_fingerprints(batch["image"]) != self.fingerprints[index])
        if bad.size:
            raise TeacherOutputMismatch(
                f"{bad.size} of {len(index)} images in this batch are not the ones the teacher's outputs were "
                f"stored for (e.g. example id {int(index[bad[0]])}); the data changed or its order no longer "
                "matches the ids. Store the teacher outputs again for this dataset.")
        return {**batch, "teacher_topk_values": self.values[index], "teacher_topk_indices": self.indices[index]}


def store_teacher_outputs(teacher_logits_fn: Callable[[np.ndarray], jax.Array], data, *, k: int,
                          view: str, batch_size: int = 256, progress: bool = False) -> StoredTeacher:
    """Run the teacher once over every example of ``data`` (in id order) and keep its top-k.

    ``teacher_logits_fn``: uint8 images ``[B, H, W, C]`` -> logits ``[B, C]`` on the fixed
    view (e.g. ``jit`` of normalise + :func:`jkd.train.teacher_logits`).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (classes kept per example); got {k!r}.")
    n = len(data)
    values = np.zeros((n, k), jnp.bfloat16)
    indices = np.zeros((n, k), np.int32)
    fingerprints = np.zeros((n,), np.uint32)
    topk = jax.jit(lambda logits: jax.lax.top_k(logits, k))
    batches = P.eval_batches(data, batch_size=batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-n // batch_size), desc="teacher outputs", unit="batch")
    for b in batches:
        logits = teacher_logits_fn(b["image"])
        if k > logits.shape[-1]:
            raise ValueError(f"k={k} exceeds the teacher's {logits.shape[-1]} classes.")
        v, i = topk(logits)
        rows = b["index"][b["mask"]]
        values[rows] = np.asarray(v.astype(jnp.bfloat16))[b["mask"]]
        indices[rows] = np.asarray(i)[b["mask"]]
        fingerprints[rows] = image_fingerprints(b["image"][b["mask"]])
    return StoredTeacher(values=values, indices=indices, fingerprints=fingerprints, view=view)


def with_teacher_targets(batches: Iterator[dict], stored: StoredTeacher, *, view: str) -> Iterator[dict]:
    """Each batch with its stored teacher targets attached (checked row by row)."""
    for b in batches:
        yield stored.targets(b, view=view)
