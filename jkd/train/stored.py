"""Teacher outputs computed once and stored: one design for image classifiers and language models.

Online distillation runs the teacher's forward pass on every step. When the student sees the
*same* input every epoch (a fixed image view, a fixed set of token sequences) the teacher's outputs
never change and can be computed once. :class:`StoredTopK` holds, for examples ``0..N-1``, the
teacher's ``k`` highest scores in bfloat16 and their class or token ids, with a fingerprint of each
example's content (:func:`fingerprints`: one rule for pixels and tokens) and the ``source``
they were computed with (the view, the teacher's identity). :meth:`StoredTopK.targets` attaches
them to a batch, found by the batch's ``index``, after checking every row against its fingerprint
and the source, so a changed or reordered dataset is an error, never a silent misalignment. The
steps that read them run without the teacher: :func:`jkd.train.train_step_stored` (images) and
:func:`jkd.train.lm_steps.stored_topk_step` (language models).

What the scores are: logits on the fixed view for a classifier (:func:`store_teacher_outputs`),
next-token log-probabilities at every position for a decoder (:func:`store_sequence_topk`); a
softmax over the kept ``k`` is the same for both, since they differ by a constant per position.
Random image augmentation is refused (:func:`check_fixed_view`): under it the teacher must see the
student's view, which changes every step (big_vision's "consistent teaching").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jkd.runtime.atomic import atomic_write
from jkd.train.state import FrozenModel

VALUES, INDICES = "teacher_topk_values", "teacher_topk_indices"  # what a batch carries to the step


class TeacherOutputMismatch(ValueError):
    """A batch's examples are not the ones the stored teacher outputs were computed on."""


def check_fixed_view(*, crop_padding: int = 0, flip: bool = False, mixup: float = 0.0) -> None:
    """Refuse random augmentation: stored teacher outputs are only valid for fixed views."""
    active = [
        f"{name}={value}"
        for name, value, on in (
            ("crop_padding", crop_padding, crop_padding > 0),
            ("flip", flip, bool(flip)),
            ("mixup", mixup, mixup > 0),
        )
        if on
    ]
    if active:
        raise ValueError(
            f"stored teacher outputs need fixed views, but random augmentation is on ({', '.join(active)}); "
            "turn it off, or distil online (the teacher then sees each step's augmented view)."
        )


@functools.lru_cache(maxsize=8)
def _position_weights(n: int) -> np.ndarray:
    # fixed odd 64-bit weights, one per position: the same on every machine and release
    return np.random.default_rng(0x6A6B64).integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def fingerprints(rows: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``[N, ...] -> uint64 [N]``: a position-weighted hash of each example's content, vectorised:
    ``sum_j (x_j + 1) * w_j`` modulo 2^64 over its elements ``x_j`` (as uint64; float data by their
    float64 bits) with fixed odd random weights ``w_j``. With ``mask`` ``[N, T]`` (an attention
    mask) only the real elements count. Another example, or the same elements in other places,
    changes it; the dtype integer rows arrive in does not."""
    rows = np.asarray(rows)
    flat = rows.reshape(len(rows), -1)
    if np.issubdtype(flat.dtype, np.integer) or flat.dtype == bool:
        x = flat.astype(np.int64).view(np.uint64)
    else:
        x = flat.astype(np.float64).view(np.uint64)
    x = x + np.uint64(1)
    if mask is not None:
        x = np.where(np.asarray(mask, bool).reshape(x.shape), x, np.uint64(0))
    with np.errstate(over="ignore"):
        return (x * _position_weights(x.shape[1])).sum(axis=1, dtype=np.uint64)  # wraps modulo 2^64, on purpose


def teacher_identity(teacher: FrozenModel, config: Any = None) -> str:
    """A name for a teacher: a hash of its parameters (shapes, dtypes, values) and its config."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(config).encode())
    for leaf in jax.tree.leaves(teacher.params):
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class StoredTopK:
    """A teacher's top-k outputs for examples ``0..N-1``.

    ``values``: bfloat16 ``[N, k]`` (a classifier) or ``[N, T-1, k]`` (a decoder, one per next-token
    position), largest first; ``indices``: int32, the same shape, their class or token ids (a last
    axis of 0 where only the values are read); ``fingerprints``: uint64 ``[N]``
    (:func:`fingerprints`) of the content they were computed on; ``source``: what they were computed
    with (a view's name, a teacher's identity), checked where they are used; ``key``: the batch
    entry that content is (``"image"``, ``"tokens"``; for tokens the batch's ``attention_mask``,
    when it has one, marks the real ones).
    """

    values: np.ndarray
    indices: np.ndarray
    fingerprints: np.ndarray
    source: str
    key: str = "image"

    def __len__(self) -> int:
        return len(self.fingerprints)

    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes + self.fingerprints.nbytes

    def targets(self, batch: dict, *, source: str | None = None) -> dict:
        """``batch`` plus ``teacher_topk_values`` / ``teacher_topk_indices`` for its rows, after
        checking ``source`` (when given) and every row's content against what was stored."""
        if source is not None and source != self.source:
            raise TeacherOutputMismatch(
                f"the stored teacher outputs were computed with {self.source!r}, but this "
                f"step uses {source!r}; store them again for it."
            )
        if "index" not in batch:
            raise ValueError(
                "the batch carries no example ids ('index'), needed to find its stored outputs; "
                "jkd.data.pipeline.train_batches and the sequence batches add them."
            )
        index = np.asarray(batch["index"])
        if index.min(initial=0) < 0 or index.max(initial=0) >= len(self):
            raise TeacherOutputMismatch(
                f"example ids {index.min()}..{index.max()} fall outside the {len(self)} "
                "stored examples; were the outputs stored for other data?"
            )
        content = np.asarray(batch[self.key])
        if self.values.ndim == 3 and content.shape[1] != self.values.shape[1] + 1:
            raise TeacherOutputMismatch(
                f"the batch's sequences have {content.shape[1]} tokens, the stored outputs "
                f"{self.values.shape[1] + 1}; store them again for this length."
            )
        mask = batch.get("attention_mask") if self.key == "tokens" else None
        bad = np.flatnonzero(fingerprints(content, mask) != self.fingerprints[index])
        if bad.size:
            raise TeacherOutputMismatch(
                f"{bad.size} of {len(index)} examples in this batch are not the ones the teacher's outputs were "
                f"stored for (e.g. example id {int(index[bad[0]])}); the data changed or its order no longer "
                "matches the ids. Store the teacher outputs again for this data."
            )
        return {**batch, VALUES: self.values[index], INDICES: self.indices[index]}

    def save(self, path: str | Path) -> None:
        """One ``.npz`` (written to a temporary name, then renamed: never half a file)."""
        atomic_write(
            path,
            lambda f: np.savez(
                f,
                values=self.values.view(np.uint16),
                indices=self.indices,
                fingerprints=self.fingerprints,
                source=np.asarray(self.source),
                key=np.asarray(self.key),
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> StoredTopK:
        with np.load(path) as z:
            return cls(
                values=z["values"].view(jnp.bfloat16),
                indices=z["indices"],
                fingerprints=z["fingerprints"],
                source=str(z["source"]),
                key=str(z["key"]),
            )


def store_topk(
    scores: Callable[[dict], jax.Array],
    batches: Iterable[dict],
    *,
    n: int,
    k: int,
    source: str,
    key: str,
    progress: bool = False,
    total: int | None = None,
    with_indices: bool = True,
) -> StoredTopK:
    """Run ``scores`` once over ``batches`` and keep each example's top ``k``.

    ``batches``: dicts with ``index`` ``[B]`` (example ids, every one of ``0..n-1`` once),
    ``mask`` ``[B]`` (the real rows of a padded batch), the content under ``key`` and, for tokens,
    an optional ``attention_mask``; ``scores(batch) -> [B, ..., C]``. ``total``: the number of
    batches, for the progress bar. ``with_indices=False`` keeps the values only (indices with a last
    axis of 0), for a loss that reads the sorted values alone.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int (classes or tokens kept per position); got {k!r}.")
    topk = jax.jit(lambda s: jax.lax.top_k(s, k))
    values = indices = None
    prints = np.zeros((n,), np.uint64)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=total, desc="teacher outputs", unit="batch")
    for b in batches:
        s = scores(b)
        if k > s.shape[-1]:
            raise ValueError(f"k={k} exceeds the teacher's {s.shape[-1]} classes or tokens.")
        v, i = topk(s)
        if values is None:
            values = np.zeros((n, *v.shape[1:]), jnp.bfloat16)
            indices = np.zeros((n, *v.shape[1:-1], v.shape[-1] if with_indices else 0), np.int32)
        real = np.asarray(b["mask"], bool)
        rows = np.asarray(b["index"])[real]
        values[rows] = np.asarray(v.astype(jnp.bfloat16))[real]
        if with_indices:
            indices[rows] = np.asarray(i)[real]
        content = np.asarray(b[key])[real]
        am = b.get("attention_mask") if key == "tokens" else None
        prints[rows] = fingerprints(content, None if am is None else np.asarray(am)[real])
    if values is None:
        raise ValueError("no examples to store teacher outputs for.")
    return StoredTopK(values=values, indices=indices, fingerprints=prints, source=source, key=key)


def store_teacher_outputs(
    teacher_logits_fn: Callable[[np.ndarray], jax.Array],
    data,
    *,
    k: int,
    view: str,
    batch_size: int = 256,
    progress: bool = False,
) -> StoredTopK:
    """A classifier's top-k logits on a fixed view, for every image of ``data`` (in id order).

    ``teacher_logits_fn``: uint8 images ``[B, H, W, C]`` -> logits ``[B, C]`` on the fixed
    view (e.g. ``jit`` of normalise + :func:`jkd.train.teacher_logits`); ``view`` names it (the
    outputs' ``source``).
    """
    from jkd.data import pipeline as P  # grain: read only by the image job

    n = len(data)
    return store_topk(
        lambda b: teacher_logits_fn(b["image"]),
        P.eval_batches(data, batch_size=batch_size),
        n=n,
        k=k,
        source=view,
        key="image",
        progress=progress,
        total=-(-n // batch_size),
    )


def _sequence_batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict]:
    tokens = np.asarray(data["tokens"])
    mask = data.get("attention_mask")
    n, t = tokens.shape
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        pad = batch_size - len(rows)  # one compiled shape for the last, short batch too
        toks = np.concatenate([tokens[rows], np.zeros((pad, t), tokens.dtype)])
        am = np.ones((n, t), bool)[rows] if mask is None else np.asarray(mask[rows], bool)
        yield {
            "tokens": toks.astype(np.int32),
            "attention_mask": np.concatenate([am, np.ones((pad, t), bool)]),
            "index": np.concatenate([rows, np.zeros(pad, rows.dtype)]),
            "mask": np.arange(batch_size) < len(rows),
        }


def store_sequence_topk(
    teacher_graphdef: nnx.GraphDef,
    teacher: FrozenModel,
    data: dict[str, np.ndarray],
    *,
    k: int,
    vocab_size: int | None = None,
    batch_size: int = 32,
    identity: str | None = None,
    progress: bool = False,
) -> StoredTopK:
    """A decoder's top-``k`` next-token log-probabilities at every position of ``data`` (``tokens
    [N, T]``, optional ``attention_mask``), over its first ``vocab_size`` ids (the shared
    vocabulary). ``identity`` names the teacher (default: :func:`teacher_identity` of its
    parameters), the outputs' ``source``."""

    @jax.jit
    def scores(params, batch_stats, rest, tokens, attention_mask):
        model = nnx.merge(teacher_graphdef, params, batch_stats, rest)
        logits = model(tokens, attention_mask=attention_mask)[:, :-1]
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        return jax.nn.log_softmax(logits, axis=-1)

    n = len(data["tokens"])
    return store_topk(
        lambda b: scores(teacher.params, teacher.batch_stats, teacher.rest, b["tokens"], b["attention_mask"]),
        _sequence_batches(data, batch_size),
        n=n,
        k=k,
        key="tokens",
        progress=progress,
        total=-(-n // batch_size),
        source=teacher_identity(teacher) if identity is None else identity,
    )


def with_teacher_targets(batches: Iterator[dict], stored: StoredTopK, *, source: str | None = None) -> Iterator[dict]:
    """Each batch with its stored teacher targets attached (checked row by row)."""
    for b in batches:
        yield stored.targets(b, source=source)


_RENAMED = {"StoredTeacher": "StoredTopK", "image_fingerprints": "fingerprints"}


def __getattr__(name: str):  # the names of earlier releases, kept working with a warning
    if name in _RENAMED:
        warnings.warn(
            f"jkd.train.stored.{name} is deprecated; use jkd.train.stored.{_RENAMED[name]}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module 'jkd.train.stored' has no attribute {name!r}")
