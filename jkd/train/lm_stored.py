"""A language-model teacher's outputs computed once: its top-k log-probabilities per token.

Token-level distillation on a fixed set of sequences runs the teacher's forward pass on every step
although its outputs never change. :func:`store_topk` runs the teacher once over sequences
``0..N-1`` and keeps, for every next-token position, the ``k`` most likely tokens' log-probabilities
(bfloat16) and ids, with a fingerprint of each sequence's tokens and the teacher's identity.
:meth:`StoredTopK.targets` attaches them to a batch (rows found by the batch's ``index``) after
checking every row's tokens against its fingerprint, so changed or reordered data is an error,
never a silent misalignment (as the image side's :mod:`jkd.train.stored`). :func:`stored_topk_step`
then trains with no teacher at all (:func:`jkd.losses.projected_topk_kl`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jkd.runtime.atomic import atomic_write
from jkd.losses import projected_topk_kl
from jkd.train.lm_steps import Batch, apply_gradients, learned_positions, next_token_hidden
from jkd.train.state import FrozenModel, TrainState


class StoredOutputMismatch(ValueError):
    """A batch's sequences are not the ones the stored teacher outputs were computed on."""


def sequence_fingerprints(tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """``int [B, T]`` -> ``uint64 [B]``: a hash of each row's real tokens (blake2b, 8 bytes)."""
    tokens = np.asarray(tokens, np.int64)
    out = np.zeros(len(tokens), np.uint64)
    for i, row in enumerate(tokens):
        if attention_mask is not None:
            row = row[np.asarray(attention_mask[i], bool)]
        out[i] = int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
    return out


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
    """Top-k next-token log-probabilities of a teacher for sequences ``0..N-1``.

    ``logprobs``: bfloat16 ``[N, T-1, k]`` (largest first, at temperature 1); ``ids``: int32
    ``[N, T-1, k]``; ``fingerprints``: uint64 ``[N]``; ``teacher``: :func:`teacher_identity`.
    """

    logprobs: np.ndarray
    ids: np.ndarray
    fingerprints: np.ndarray
    teacher: str

    def __len__(self) -> int:
        return len(self.fingerprints)

    def nbytes(self) -> int:
        return self.logprobs.nbytes + self.ids.nbytes + self.fingerprints.nbytes

    def targets(self, batch: dict, *, teacher: str | None = None) -> dict:
        """``batch`` plus ``teacher_logprobs`` / ``teacher_ids`` for its rows, after checking every
        row's tokens (and, if given, the teacher) against what was stored."""
        if teacher is not None and teacher != self.teacher:
            raise StoredOutputMismatch(f"the stored outputs are of teacher {self.teacher}, not {teacher}; store them "
                                       "again for this teacher")
        if "index" not in batch:
            raise ValueError("the batch carries no sequence ids ('index'), needed to find its stored outputs")
        index = np.asarray(batch["index"])
        if index.min(initial=0) < 0 or index.max(initial=0) >= len(self):
            raise StoredOutputMismatch(f"sequence ids {index.min()}..{index.max()} fall outside the {len(self)} "
                                       "stored sequences")
        tokens = np.asarray(batch["tokens"])
        if tokens.shape[1] - 1 != self.logprobs.shape[1]:
            raise StoredOutputMismatch(f"batch sequences have {tokens.shape[1]} tokens, the stored outputs "
                                       f"{self.logprobs.shape[1] + 1}")
        got = sequence_fingerprints(tokens, batch.get("attention_mask"))
        bad = np.flatnonzero(got != self.fingerprints[index])
        if bad.size:
            raise StoredOutputMismatch(
                f"{bad.size} of {len(index)} sequences in this batch are not the ones the teacher's outputs were "
                f"stored for (e.g. sequence id {int(index[bad[0]])}); the data changed or its order no longer "
                "matches the ids. Store the teacher outputs again for this data.")
        return {**batch, "teacher_logprobs": self.logprobs[index], "teacher_ids": self.ids[index]}

    def save(self, path: str | Path) -> None:
        """One ``.npz`` (written to a temporary name, then renamed: never half a file)."""
        atomic_write(path, lambda f: np.savez(f, logprobs=self.logprobs.view(np.uint16), ids=self.ids,
                                              fingerprints=self.fingerprints, teacher=np.asarray(self.teacher)))

    @classmethod
    def load(cls, path: str | Path) -> StoredTopK:
        with np.load(path) as z:
            return cls(logprobs=z["logprobs"].view(jnp.bfloat16), ids=z["ids"], fingerprints=z["fingerprints"],
                       teacher=str(z["teacher"]))


def store_topk(teacher_graphdef: nnx.GraphDef, teacher: FrozenModel, data: dict[str, np.ndarray], *, k: int,
               vocab_size: int | None = None, batch_size: int = 32, identity: str | None = None) -> StoredTopK:
    """Run the teacher once over ``data`` (``tokens [N, T]``, optional ``attention_mask``) and keep
    its top-``k`` next-token log-probabilities over the first ``vocab_size`` ids (the shared
    vocabulary) at every position. ``identity`` names the teacher (default:
    :func:`teacher_identity` of its parameters), checked where the outputs are used."""
    tokens = np.asarray(data["tokens"])
    mask = data.get("attention_mask")
    n, t = tokens.shape
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")

    @jax.jit
    def topk(params, batch_stats, rest, toks, am):
        model = nnx.merge(teacher_graphdef, params, batch_stats, rest)
        logits = model(toks, attention_mask=am)[:, :-1]
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        v, i = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
        return v.astype(jnp.bfloat16), i.astype(jnp.int32)

    logprobs = np.zeros((n, t - 1, k), jnp.bfloat16)
    ids = np.zeros((n, t - 1, k), np.int32)
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        toks = tokens[sl]
        am = np.ones(toks.shape, bool) if mask is None else np.asarray(mask[sl], bool)
        pad = batch_size - len(toks)  # one compiled shape for the last, short batch too
        if pad:
            toks = np.concatenate([toks, np.zeros((pad, t), toks.dtype)])
            am = np.concatenate([am, np.ones((pad, t), bool)])
        v, i = topk(teacher.params, teacher.batch_stats, teacher.rest, jnp.asarray(toks, jnp.int32), jnp.asarray(am))
        logprobs[sl] = np.asarray(v)[:batch_size - pad]
        ids[sl] = np.asarray(i)[:batch_size - pad]
    return StoredTopK(logprobs=logprobs, ids=ids, fingerprints=sequence_fingerprints(tokens, mask),
                      teacher=teacher_identity(teacher) if identity is None else identity)


def with_stored_targets(batches: Iterator[dict], stored: StoredTopK, *, teacher: str | None = None) -> Iterator[dict]:
    """Each batch with its stored teacher outputs attached (checked row by row)."""
    for b in batches:
        yield stored.targets(b, teacher=teacher)


@struct.dataclass
class StoredTopKKD:
    """``kd_weight * KL(stored top-k teacher || student) + ce_weight * CE``, a token mean."""

    temperature: float = struct.field(pytree_node=False, default=1.0)
    kd_weight: float = struct.field(pytree_node=False, default=1.0)
    ce_weight: float = struct.field(pytree_node=False, default=0.0)
    chunk_size: int = struct.field(pytree_node=False, default=1024)


def stored_topk_step(
    state: TrainState, batch: Batch, objective: StoredTopKKD, teacher: None = None, *, graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step against stored teacher outputs (``batch`` from :meth:`StoredTopK.targets`):
    no teacher forward pass."""
    where = learned_positions(batch)
    num_tokens = jnp.sum(where, dtype=jnp.int32)

    def loss_fn(params):
        student = nnx.merge(graphdef, params, state.batch_stats, state.rest)
        return projected_topk_kl(next_token_hidden(student, batch), student.output_weight(), batch["teacher_logprobs"], batch["teacher_ids"],
                                 temperature=objective.temperature, where=where, num_tokens=num_tokens,
                                 labels=batch["tokens"][:, 1:], divergence_weight=objective.kd_weight,
                                 label_weight=objective.ce_weight, chunk_size=objective.chunk_size)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(state, grads, tx), {"loss": loss, "tokens": num_tokens}
