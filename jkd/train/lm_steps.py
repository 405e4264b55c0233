"""Pure train steps that distil a language model into another, token by token.

A batch is a dict of ``[B, T]`` arrays: ``tokens`` (int32), ``loss_mask`` (bool: the tokens the
student must learn, e.g. ``ChatTokens.assistant_mask``; never prompt, padding or tool results),
optionally ``attention_mask`` (bool, real tokens) and ``segment_ids`` (packed rows). Position ``i``
predicts token ``i + 1``, so the learned positions are ``loss_mask[:, 1:]``.

The loss of a step is a token mean over the learned tokens of the *whole* step: the denominator is
counted over every micro-batch of gradient accumulation (and, under ``jit`` over a mesh, over
every device, since the batch is one global array), so 4 micro-batches of 8 sequences give the
gradient of one batch of 32, whatever the sequences' lengths.

The teacher is frozen data (:class:`~jkd.train.state.FrozenModel`, bfloat16 allowed); the
student is a :class:`~jkd.train.state.TrainState`. Vocabularies that differ only by padding rows
are cut to the shared ``vocab_size`` (see :func:`jkd.data.vocab.shared_vocabulary`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jkd.losses import Divergence, ForwardKL, projected_token_divergence
from jkd.train.state import FrozenModel, TrainState

Batch = dict[str, jax.Array]


@struct.dataclass
class TokenKD:
    """``kd_weight * D(teacher || student) + ce_weight * CE(next tokens)``, a token mean.

    ``divergence``: :class:`~jkd.losses.ForwardKL` (default), ``ReverseKL``, ``GeneralizedJSD``,
    ``SkewForwardKL``, ``SkewReverseKL`` or ``TotalVariation``; ``temperature`` applies to the
    divergence only. ``kd_weight=0`` is supervised fine-tuning of the student alone (no teacher
    forward pass). ``chunk_size`` tokens at a time meet the vocabulary (bounded memory).
    """

    divergence: Divergence = struct.field(pytree_node=False, default=ForwardKL())
    temperature: float = struct.field(pytree_node=False, default=1.0)
    kd_weight: float = struct.field(pytree_node=False, default=1.0)
    ce_weight: float = struct.field(pytree_node=False, default=0.0)
    vocab_size: int | None = struct.field(pytree_node=False, default=None)
    chunk_size: int = struct.field(pytree_node=False, default=1024)

    def __post_init__(self):
        for name in ("kd_weight", "ce_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"TokenKD.{name} must be a non-negative number; got {v!r}")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("TokenKD: kd_weight and ce_weight are both 0; nothing would be learned")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"TokenKD.temperature must be > 0; got {self.temperature!r}")


def learned_positions(batch: Batch) -> jax.Array:
    """``[B, T-1]`` bool: the positions whose next token counts."""
    where = batch["loss_mask"][:, 1:].astype(bool)
    if "attention_mask" in batch:
        where = where & batch["attention_mask"][:, 1:].astype(bool)
    return where


def _hidden(model, batch: Batch) -> jax.Array:
    kwargs = {k: batch[k] for k in ("attention_mask", "segment_ids", "positions") if k in batch}
    return model.hidden_states(batch["tokens"], **kwargs)[:, :-1]


def token_kd_loss(student, teacher, batch: Batch, objective: TokenKD, *, num_tokens: jax.Array) -> jax.Array:
    """The step's loss on one (micro-)batch, divided by the step's ``num_tokens``."""
    vocab = objective.vocab_size
    ws = student.output_weight()
    vocab = ws.shape[0] if vocab is None else vocab
    hs = _hidden(student, batch)
    if objective.kd_weight > 0:
        ht = jax.lax.stop_gradient(_hidden(teacher, batch))
        wt = jax.lax.stop_gradient(teacher.output_weight())[:vocab]
    else:  # no teacher forward pass: any array of the right rank serves
        ht, wt = hs, ws[:vocab]
    return projected_token_divergence(
        hs, ws[:vocab], ht, wt, divergence=objective.divergence, temperature=objective.temperature,
        where=learned_positions(batch), num_tokens=num_tokens, labels=batch["tokens"][:, 1:],
        divergence_weight=objective.kd_weight, label_weight=objective.ce_weight, chunk_size=objective.chunk_size)


def _split_micro(batch: Batch, micro_batches: int) -> Batch:
    b = batch["tokens"].shape[0]
    if b % micro_batches:
        raise ValueError(f"batch of {b} sequences does not split into {micro_batches} micro-batches")
    return {k: v.reshape((micro_batches, b // micro_batches) + v.shape[1:]) for k, v in batch.items()}


def token_kd_step(
    state: TrainState, batch: Batch, objective: TokenKD, teacher: FrozenModel | None = None, *,
    graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef | None, tx: optax.GradientTransformation,
    micro_batches: int = 1,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step of token-level distillation on ``batch`` (``[B, T]`` arrays), with
    ``micro_batches`` rounds of gradient accumulation. The signature of the image steps, so the
    runners of :mod:`jkd.train.parallel` and the fit loop (checkpoints, resume) drive it as they
    are: ``run = parallel.single_device(functools.partial(token_kd_step, graphdef=..., ...))``.

    Returns the new state and ``{"loss", "tokens"}`` (the step's token mean and its count).
    """
    num_tokens = jnp.sum(learned_positions(batch), dtype=jnp.int32)
    teacher_model = None
    if objective.kd_weight > 0:
        if teacher is None or teacher_graphdef is None:
            raise ValueError("TokenKD with kd_weight > 0 needs the teacher (teacher, teacher_graphdef)")
        teacher_model = nnx.merge(teacher_graphdef, teacher.params, teacher.batch_stats, teacher.rest)

    def loss_fn(params, micro):
        student = nnx.merge(graphdef, params, state.batch_stats, state.rest)
        return token_kd_loss(student, teacher_model, micro, objective, num_tokens=num_tokens)

    grad_fn = jax.value_and_grad(loss_fn)
    if micro_batches == 1:
        loss, grads = grad_fn(state.params, batch)
    else:
        def accumulate(acc, micro):
            loss_m, g = grad_fn(state.params, micro)
            return jax.tree.map(jnp.add, acc, g), loss_m

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(accumulate, zeros, _split_micro(batch, micro_batches))
        loss = jnp.sum(losses)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": loss, "tokens": num_tokens}
