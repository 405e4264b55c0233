"""The train step that distils across tokenizers: the teacher reads its own tokens of the text, the
student its own, and the loss compares them span by span (:func:`jkd.losses.cross_tokenizer_divergence`).

A batch holds the student's rows as every language-model step has them (``tokens``,
``loss_mask``, ``attention_mask`` ``[B, Ts]``), the teacher's rows of the same conversations
(``teacher_tokens``, ``teacher_attention_mask`` ``[B, Tt]``) and the rows' spans
(:class:`jkd.data.align.SpanLayout`, batched: ``student_first``, ``teacher_first``, ``span_exact``,
``span_where`` ``[B, S]``, ``student_chain`` ``[B, Ts]``, ``teacher_chain`` ``[B, Tt]``); the
tokens both vocabularies hold are bound to the step (``shared``), not carried by every batch.

The loss is ``kd_weight`` times the mean over the step's learned spans plus ``ce_weight`` times the
student's cross-entropy, a mean over its learned tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jkd.losses import (
    Divergence,
    projected_cross_tokenizer_divergence,
    projected_token_divergence,
    stored_cross_tokenizer_divergence,
    teacher_span_values,
    token_mean,
)
from jkd.losses._cross import STORED_FLOOR
from jkd.train.lm_steps import (
    Batch,
    _check_weights_and_temperature,
    _student,
    apply_gradients,
    learned_positions,
    teacher_for,
)
from jkd.train.state import FrozenModel, TrainState
from jkd.train.stored import INDICES, VALUES, StoredTopK, store_topk, teacher_identity

SPAN_KEYS = (
    "teacher_tokens",
    "teacher_attention_mask",
    "student_first",
    "teacher_first",
    "student_chain",
    "teacher_chain",
    "span_exact",
    "span_where",
)


@struct.dataclass
class CrossTokenizerKD:
    """Distillation between models with different tokenizers.

    ``divergence=None``: ULD on every span (Boizard et al. 2024); a divergence (``ForwardKL()``,
    ``GeneralizedJSD()``, ...): GOLD's hybrid, that divergence on the spans that are one token with
    the same string in both vocabularies (over the tokens both hold), ULD elsewhere.
    ``ce_weight``: the student's own cross-entropy on the learned tokens beside it.
    ``chunk_size`` rows of either model's logits are formed at a time (bounded memory).
    ``stored``: the teacher's span values computed once (:func:`store_span_teacher`), its top
    ``k >= min(V_student, V_teacher)`` per span: no teacher pass and no sort over its vocabulary per step, and the
    student's gradient of the full loss (:func:`jkd.losses.stored_cross_tokenizer_divergence`)."""

    divergence: Divergence | None = struct.field(pytree_node=False, default=None)
    temperature: float = struct.field(pytree_node=False, default=1.0)
    kd_weight: float = struct.field(pytree_node=False, default=1.0)
    ce_weight: float = struct.field(pytree_node=False, default=0.0)
    chunk_size: int = struct.field(pytree_node=False, default=128)
    stored: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        _check_weights_and_temperature(self)

    @property
    def name(self) -> str:
        return "uld" if self.divergence is None else "hybrid"


def _hidden(model, tokens, attention_mask) -> jax.Array:
    """``[B, T, D]``: the final hidden states (position ``n`` predicts token ``n + 1``)."""
    return model.hidden_states(tokens, attention_mask=attention_mask)


def _next_tokens(tokens: jax.Array) -> jax.Array:
    """``[B, T]`` -> ``[B, T]``: each position's next token (the last repeats; it is never learned)."""
    return jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)


def cross_tokenizer_loss(
    student,
    teacher,
    batch: Batch,
    objective: CrossTokenizerKD,
    *,
    shared: tuple[Any, Any] | None,
    num_spans: jax.Array,
    num_tokens: jax.Array,
) -> jax.Array:
    """The step's loss on ``batch``: the span mean over ``num_spans`` and, with ``ce_weight``, the
    token mean over ``num_tokens``; both models' logits are formed ``chunk_size`` rows at a time
    (:func:`jkd.losses.projected_cross_tokenizer_divergence`, :func:`jkd.losses.projected_token_divergence`)."""
    s_tokens, s_att = batch["tokens"], batch["attention_mask"].astype(bool)
    hs, ws = _hidden(student, s_tokens, s_att), student.output_weight()
    loss = jnp.zeros((), jnp.float32)
    if objective.kd_weight > 0 and objective.stored:
        s = batch["span_where"].shape[1]
        pad = [(0, 0), (0, s - batch[VALUES].shape[1]), (0, 0)]  # the stored values cover T-1 spans
        values = stored_cross_tokenizer_divergence(
            hs,
            ws,
            jnp.pad(batch[VALUES].astype(jnp.float32), pad, constant_values=STORED_FLOOR),
            jnp.pad(batch[INDICES], pad),
            student_targets=_next_tokens(s_tokens),
            student_first=batch["student_first"],
            student_chain=batch["student_chain"],
            exact=batch["span_exact"],
            where=batch["span_where"],
            divergence=objective.divergence,
            student_of_teacher=None if shared is None else _student_of(shared),
            temperature=objective.temperature,
            chunk_size=objective.chunk_size,
        )
        loss = loss + objective.kd_weight * token_mean(values, batch["span_where"], num_tokens=num_spans)
    elif objective.kd_weight > 0:
        t_tokens = batch["teacher_tokens"]
        ht = jax.lax.stop_gradient(_hidden(teacher, t_tokens, batch["teacher_attention_mask"].astype(bool)))
        wt = jax.lax.stop_gradient(teacher.output_weight())
        values = projected_cross_tokenizer_divergence(
            hs,
            ws,
            ht,
            wt,
            student_targets=_next_tokens(s_tokens),
            teacher_targets=_next_tokens(t_tokens),
            student_first=batch["student_first"],
            teacher_first=batch["teacher_first"],
            student_chain=batch["student_chain"],
            teacher_chain=batch["teacher_chain"],
            exact=batch["span_exact"],
            where=batch["span_where"],
            divergence=objective.divergence,
            shared=shared,
            temperature=objective.temperature,
            chunk_size=objective.chunk_size,
        )
        loss = loss + objective.kd_weight * token_mean(values, batch["span_where"], num_tokens=num_spans)
    if objective.ce_weight > 0:  # the labels' cross-entropy alone: the fused loss with no divergence term
        h = hs[:, :-1]
        loss = loss + projected_token_divergence(
            h,
            ws,
            jnp.zeros(h.shape[:-1] + (1,), h.dtype),
            jnp.zeros((ws.shape[0], 1), ws.dtype),
            where=learned_positions(batch),
            num_tokens=num_tokens,
            labels=s_tokens[:, 1:],
            divergence_weight=0.0,
            label_weight=objective.ce_weight,
            chunk_size=objective.chunk_size,
        )
    return loss


def _student_of(shared) -> jax.Array:
    """``[max teacher id + 1]``: the student id of each shared teacher id (0 elsewhere)."""
    t_ids, s_ids = shared
    return jnp.zeros((int(np.max(np.asarray(t_ids), initial=0)) + 1,), jnp.int32).at[t_ids].set(s_ids)


def cross_tokenizer_step(
    state: TrainState,
    batch: Batch,
    objective: CrossTokenizerKD,
    teacher: FrozenModel | None = None,
    *,
    graphdef: nnx.GraphDef,
    teacher_graphdef: nnx.GraphDef | None,
    tx: optax.GradientTransformation,
    shared: tuple[np.ndarray, np.ndarray] | None = None,
    compute_dtype=None,
    quant: str | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step of cross-tokenizer distillation (the signature of
    :func:`jkd.train.lm_steps.token_kd_step`, with the ``shared`` tokens bound: ``(teacher_ids,
    student_ids)``, :func:`jkd.data.align.shared_tokens`; needed by the hybrid). Returns the new
    state and ``{"loss", "tokens", "spans"}``."""
    missing = [k for k in ("attention_mask", *SPAN_KEYS) if k not in batch]
    if missing:
        raise ValueError(
            f"a cross-tokenizer batch needs {', '.join(missing)} (the teacher's rows and the spans: jkd.data.align)"
        )
    if objective.divergence is not None and shared is None:
        raise ValueError("the hybrid cross-tokenizer loss needs the shared tokens (shared=(teacher_ids, student_ids))")
    num_spans = jnp.sum(batch["span_where"], dtype=jnp.int32)
    num_tokens = jnp.sum(learned_positions(batch), dtype=jnp.int32)
    if objective.stored and objective.kd_weight > 0 and VALUES not in batch:
        raise ValueError(
            "a stored cross-tokenizer objective reads the teacher's span values from the batch "
            f"({VALUES}, {INDICES}: StoredTopK.targets of store_span_teacher's output)"
        )
    teacher_model = None if objective.stored else teacher_for(objective, teacher, teacher_graphdef)
    shared = None if shared is None else tuple(np.asarray(x, np.int32) for x in shared)

    def loss_fn(params):
        student = _student(graphdef, params, state, compute_dtype, quant)
        return cross_tokenizer_loss(
            student, teacher_model, batch, objective, shared=shared, num_spans=num_spans, num_tokens=num_tokens
        )

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(state, grads, tx), {"loss": loss, "tokens": num_tokens, "spans": num_spans}


def store_span_teacher(
    teacher_graphdef: nnx.GraphDef,
    teacher: FrozenModel,
    aligned,
    objective: CrossTokenizerKD,
    *,
    k: int,
    length: int,
    pad_id: int,
    teacher_pad_id: int,
    shared: tuple[np.ndarray, np.ndarray] | None = None,
    batch_size: int = 4,
    identity: str | None = None,
    progress: bool = False,
) -> StoredTopK:
    """The teacher's side of ``objective`` for every row of ``aligned`` (:class:`jkd.data.align.AlignedRows`),
    computed once: per span, the top ``k`` of :func:`jkd.losses.teacher_span_values` (``[N, length - 1,
    k]``, bfloat16, with their teacher ids for the hybrid; ULD reads the values only), fingerprinted
    by the student's rows as their batches hold them (``length`` tokens, ``pad_id``), as
    :class:`~jkd.train.stored.StoredTopK` keeps every stored teacher. ``k`` at least the smaller
    vocabulary (the student's rows, or the teacher's whole vocabulary) keeps the student's gradient
    exact. ``identity`` names the teacher (default: a hash of its weights)."""
    hybrid = objective.divergence is not None
    if hybrid and shared is None:
        raise ValueError("the hybrid's stored values need the shared tokens (shared=(teacher_ids, student_ids))")
    t_ids = None if shared is None else jnp.asarray(shared[0], jnp.int32)

    @jax.jit
    def scores(params, batch_stats, rest, batch):
        model = nnx.merge(teacher_graphdef, params, batch_stats, rest)
        tokens = batch["teacher_tokens"]
        logits = model(tokens, attention_mask=batch["teacher_attention_mask"].astype(bool))
        targets = _next_tokens(tokens)
        spans = slice(0, length - 1)  # a row of `length` tokens has at most length - 1 spans
        return teacher_span_values(
            logits,
            teacher_targets=targets,
            teacher_first=batch["teacher_first"][:, spans],
            teacher_chain=batch["teacher_chain"],
            exact=batch["span_exact"][:, spans] if hybrid else None,
            shared_teacher=t_ids,
            temperature=objective.temperature,
        )

    n = len(aligned)

    def batches():
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            real = np.arange(batch_size) < len(rows)
            rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])  # one compiled shape
            b = aligned.batch(rows, length=length, teacher_length=length, pad_id=pad_id, teacher_pad_id=teacher_pad_id)
            yield {**b, "index": rows, "mask": real}

    source = identity if identity is not None else teacher_identity(teacher)
    return store_topk(
        lambda b: scores(
            teacher.params,
            teacher.batch_stats,
            teacher.rest,
            {
                key: b[key]
                for key in ("teacher_tokens", "teacher_attention_mask", "teacher_first", "teacher_chain", "span_exact")
            },
        ),
        batches(),
        n=n,
        k=k,
        key="tokens",
        progress=progress,
        total=-(-n // batch_size),
        source=f"{source} {objective.name} T={objective.temperature:g}",
        with_indices=hybrid,  # ULD reads the sorted values only
    )
