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

import math

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jkd.compress.gguf_blocks import fake_quantize
from jkd.losses import Divergence, ForwardKL, GeneralizedJSD, projected_token_divergence, projected_topk_kl
from jkd.models.sampler import SamplingConfig, default_pad_id, generate_tokens, stop_token_array
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
        _check_weights_and_temperature(self)


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_temperature(owner: str, t) -> None:
    """A temperature of ``inf`` flattens both distributions to uniform: the loss is 0 and nothing is
    learned, so it is refused with ``nan`` and values <= 0."""
    if not (_finite_number(t) and t > 0):
        raise ValueError(f"{owner}.temperature must be a finite number > 0; got {t!r}")


def _check_weights_and_temperature(objective) -> None:
    owner = type(objective).__name__
    for name in ("kd_weight", "ce_weight"):
        v = getattr(objective, name)
        if not _finite_number(v) or v < 0:
            raise ValueError(f"{owner}.{name} must be a finite number >= 0; got {v!r}")
    if objective.kd_weight == 0 and objective.ce_weight == 0:
        raise ValueError(f"{owner}: kd_weight and ce_weight are both 0; nothing would be learned")
    _check_temperature(owner, objective.temperature)


def learned_positions(batch: Batch) -> jax.Array:
    """``[B, T-1]`` bool: the positions whose next token counts (never the last token of a packed
    sequence, whose next token starts another one)."""
    where = batch["loss_mask"][:, 1:].astype(bool)
    if "attention_mask" in batch:
        where = where & batch["attention_mask"][:, 1:].astype(bool)
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        where = where & (seg[:, 1:] == seg[:, :-1])
    return where


def next_token_hidden(model, batch: Batch) -> jax.Array:
    """``[B, T-1, D]``: the final hidden states of the positions that predict a next token."""
    kwargs = {k: batch[k] for k in ("attention_mask", "segment_ids", "positions") if k in batch}
    return model.hidden_states(batch["tokens"], **kwargs)[:, :-1]


def in_compute_dtype(params, compute_dtype):
    """``params`` with their floating leaves cast to ``compute_dtype`` (None: as they are): mixed
    precision keeps float32 master weights in the state and runs the forward and backward passes in
    ``compute_dtype`` (e.g. bfloat16); the cast's gradient returns in the master weights' dtype."""
    if compute_dtype is None:
        return params
    return jax.tree.map(lambda p: p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _student(graphdef: nnx.GraphDef, params, state: TrainState, compute_dtype, quant: str | None = None):
    """The student of ``params`` as its passes run: its weights as a GGUF file at ``quant`` holds
    them (quantization-aware training, straight-through gradients; None: as they are), in
    ``compute_dtype``."""
    params = fake_quantize(params, quant)
    return nnx.merge(graphdef, in_compute_dtype(params, compute_dtype), state.batch_stats, state.rest)


def teacher_for(objective, teacher: FrozenModel | None, teacher_graphdef: nnx.GraphDef | None):
    """The frozen teacher as a model when ``objective.kd_weight > 0`` (refused, naming the
    objective, when it is missing), else None: a step with no distillation term runs no teacher."""
    if objective.kd_weight <= 0:
        return None
    if teacher is None or teacher_graphdef is None:
        raise ValueError(f"{type(objective).__name__} with kd_weight > 0 needs the teacher (teacher, teacher_graphdef)")
    return nnx.merge(teacher_graphdef, teacher.params, teacher.batch_stats, teacher.rest)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation) -> TrainState:
    """One optimizer update of the student; the step count advances (it is the data position)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def token_kd_loss(student, teacher, batch: Batch, objective: TokenKD, *, num_tokens: jax.Array) -> jax.Array:
    """The step's loss on one (micro-)batch, divided by the step's ``num_tokens``."""
    vocab = objective.vocab_size
    ws = student.output_weight()
    vocab = ws.shape[0] if vocab is None else vocab
    hs = next_token_hidden(student, batch)
    if objective.kd_weight > 0:
        ht = jax.lax.stop_gradient(next_token_hidden(teacher, batch))
        wt = jax.lax.stop_gradient(teacher.output_weight())[:vocab]
    else:  # no teacher forward pass: width-1 placeholders of the right rank, never read
        ht, wt = jnp.zeros(hs.shape[:-1] + (1,), hs.dtype), jnp.zeros((vocab, 1), ws.dtype)
    return projected_token_divergence(
        hs,
        ws[:vocab],
        ht,
        wt,
        divergence=objective.divergence,
        temperature=objective.temperature,
        where=learned_positions(batch),
        num_tokens=num_tokens,
        labels=batch["tokens"][:, 1:],
        divergence_weight=objective.kd_weight,
        label_weight=objective.ce_weight,
        chunk_size=objective.chunk_size,
    )


def _split_micro(batch: Batch, micro_batches: int) -> Batch:
    b = batch["tokens"].shape[0]
    if b % micro_batches:
        raise ValueError(f"batch of {b} sequences does not split into {micro_batches} micro-batches")
    return {k: v.reshape((micro_batches, b // micro_batches) + v.shape[1:]) for k, v in batch.items()}


def token_kd_step(
    state: TrainState,
    batch: Batch,
    objective: TokenKD,
    teacher: FrozenModel | None = None,
    *,
    graphdef: nnx.GraphDef,
    teacher_graphdef: nnx.GraphDef | None,
    tx: optax.GradientTransformation,
    micro_batches: int = 1,
    compute_dtype=None,
    quant: str | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step of token-level distillation on ``batch`` (``[B, T]`` arrays), with
    ``micro_batches`` rounds of gradient accumulation and the student's passes in ``compute_dtype``
    (:func:`in_compute_dtype`; None: its parameters' dtype) and, with ``quant`` (``q8_0``, ``q4_0``),
    its weights as the GGUF file will hold them (:mod:`jkd.compress.gguf_blocks`: quantization-aware
    distillation). The signature of the image steps, so the
    runners of :mod:`jkd.train.parallel` and the fit loop (checkpoints, resume) drive it as they
    are: ``run = parallel.single_device(functools.partial(token_kd_step, graphdef=..., ...))``.

    Returns the new state and ``{"loss", "tokens"}`` (the step's token mean and its count).
    """
    num_tokens = jnp.sum(learned_positions(batch), dtype=jnp.int32)
    teacher_model = teacher_for(objective, teacher, teacher_graphdef)

    def loss_fn(params, micro):
        student = _student(graphdef, params, state, compute_dtype, quant)
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
    return apply_gradients(state, grads, tx), {"loss": loss, "tokens": num_tokens}


@struct.dataclass
class StoredTopKKD:
    """``kd_weight * KL(stored top-k teacher || student) + ce_weight * CE``, a token mean: token KD
    from the teacher's outputs stored once (:func:`jkd.train.stored.store_sequence_topk`), the
    teacher's distribution renormalised over its ``top_k`` tokens. ``vocab_size``: the student's
    rows the softmax covers (the shared vocabulary; None: all)."""

    temperature: float = struct.field(pytree_node=False, default=1.0)
    kd_weight: float = struct.field(pytree_node=False, default=1.0)
    ce_weight: float = struct.field(pytree_node=False, default=0.0)
    chunk_size: int = struct.field(pytree_node=False, default=1024)
    top_k: int = struct.field(pytree_node=False, default=8)
    vocab_size: int | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        _check_weights_and_temperature(self)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"StoredTopKKD.top_k must be a whole number >= 1; got {self.top_k!r}")


def stored_topk_step(
    state: TrainState,
    batch: Batch,
    objective: StoredTopKKD,
    teacher: None = None,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    teacher_graphdef: None = None,
    compute_dtype=None,
    quant: str | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step against stored teacher outputs: no teacher forward pass (the student's
    passes in ``compute_dtype``, as in :func:`token_kd_step`). ``batch``
    carries ``teacher_topk_values`` / ``teacher_topk_indices`` ``[B, T-1, k]`` (attached and checked
    by :meth:`jkd.train.stored.StoredTopK.targets`); ``teacher`` must be None."""
    if teacher is not None:
        raise ValueError("stored_topk_step runs without the teacher; pass teacher=None (its outputs are in the batch)")
    where = learned_positions(batch)
    num_tokens = jnp.sum(where, dtype=jnp.int32)

    def loss_fn(params):
        student = _student(graphdef, params, state, compute_dtype, quant)
        ws = student.output_weight()
        ws = ws if objective.vocab_size is None else ws[: objective.vocab_size]
        return projected_topk_kl(
            next_token_hidden(student, batch),
            ws,
            batch["teacher_topk_values"],
            batch["teacher_topk_indices"],
            temperature=objective.temperature,
            where=where,
            num_tokens=num_tokens,
            labels=batch["tokens"][:, 1:],
            divergence_weight=objective.kd_weight,
            label_weight=objective.ce_weight,
            chunk_size=objective.chunk_size,
        )

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(state, grads, tx), {"loss": loss, "tokens": num_tokens}


@struct.dataclass
class OnPolicyKD:
    """Generalised knowledge distillation (Agarwal et al. 2024, GKD): with probability
    ``student_fraction`` (their lambda) a step trains on the student's own continuations of the
    batch's prompts, sampled inside the step by the jitted sampler and scored by the teacher;
    otherwise on the batch's given completions. ``divergence`` defaults to the symmetric JSD
    (their beta = 0.5). The draw is keyed by the state's RNG and step: a resumed run makes the same
    choices and samples the same tokens.
    """

    divergence: Divergence = struct.field(pytree_node=False, default=GeneralizedJSD(beta=0.5))
    temperature: float = struct.field(pytree_node=False, default=1.0)
    student_fraction: float = struct.field(pytree_node=False, default=0.5)
    max_new_tokens: int = struct.field(pytree_node=False, default=32)
    sampling: SamplingConfig = struct.field(pytree_node=False, default=SamplingConfig(temperature=1.0))
    vocab_size: int | None = struct.field(pytree_node=False, default=None)
    chunk_size: int = struct.field(pytree_node=False, default=1024)

    def __post_init__(self):
        _check_temperature("OnPolicyKD", self.temperature)
        if not (_finite_number(self.student_fraction) and 0 <= self.student_fraction <= 1):
            raise ValueError(f"OnPolicyKD.student_fraction must lie in [0, 1]; got {self.student_fraction!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"OnPolicyKD.max_new_tokens must be a positive int; got {self.max_new_tokens!r}")

    def token_kd(self) -> TokenKD:
        return TokenKD(
            divergence=self.divergence,
            temperature=self.temperature,
            vocab_size=self.vocab_size,
            chunk_size=self.chunk_size,
        )


def prompt_and_completion(
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    completions: jax.Array,
    completion_lengths: jax.Array,
    *,
    pad_id: int = 0,
) -> Batch:
    """Join right-padded ``prompts [B, P]`` and ``completions [B, N]`` row by row into a
    ``[B, P + N]`` batch whose ``loss_mask`` marks the completion tokens."""
    b, p = prompts.shape
    n = completions.shape[1]
    j = jnp.arange(p + n)[None, :]
    lp, lc = prompt_lengths[:, None], completion_lengths[:, None]
    from_prompt = jnp.take_along_axis(prompts, jnp.clip(j, 0, p - 1).repeat(b, 0), axis=1)
    from_completion = jnp.take_along_axis(completions, jnp.clip(j - lp, 0, n - 1), axis=1)
    tokens = jnp.where(j < lp, from_prompt, jnp.where(j < lp + lc, from_completion, pad_id))
    return {"tokens": tokens.astype(jnp.int32), "attention_mask": j < lp + lc, "loss_mask": (j >= lp) & (j < lp + lc)}


def _pad_rows(seqs: Batch, length: int, pad_id: int) -> Batch:
    """Right-pad ``[B, T]`` rows to ``[B, length]`` (pad tokens, nothing attended or learned)."""
    extra = length - seqs["tokens"].shape[1]
    if extra == 0:
        return seqs
    return {
        k: jnp.pad(v, ((0, 0), (0, extra)), constant_values=pad_id if k == "tokens" else False) for k, v in seqs.items()
    }


def on_policy_step(
    state: TrainState,
    batch: Batch,
    objective: OnPolicyKD,
    teacher: FrozenModel,
    *,
    graphdef: nnx.GraphDef,
    teacher_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    compute_dtype=None,
    quant: str | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """One GKD step (the student's sampling and passes in ``compute_dtype``, as in
    :func:`token_kd_step`). ``batch`` holds the given sequences (``tokens``, ``loss_mask``,
    ``attention_mask``) and their prompts (``prompt_tokens [B, P]`` right-padded,
    ``prompt_lengths [B]``). Metrics: ``loss``, ``tokens``, ``on_policy`` (1 when the step
    trained on the student's samples)."""
    key = jax.random.fold_in(state.rng, state.step)
    draw, sample_key = jax.random.split(key)
    use_student = jax.random.bernoulli(draw, objective.student_fraction)
    kd = objective.token_kd()
    teacher_model = nnx.merge(teacher_graphdef, teacher.params, teacher.batch_stats, teacher.rest)

    def grads_on(seqs: Batch):
        n = jnp.sum(learned_positions(seqs), dtype=jnp.int32)

        def loss_fn(params):
            student = _student(graphdef, params, state, compute_dtype, quant)
            return token_kd_loss(student, teacher_model, seqs, kd, num_tokens=n)

        loss, g = jax.value_and_grad(loss_fn)(state.params)
        return loss, g, n

    given = {k: batch[k] for k in ("tokens", "loss_mask", "attention_mask") if k in batch}
    # The step's rows, given or sampled, in one length so the choice between them is a choice of
    # rows and the gradient is computed once: under ``vmap`` (seeds) a ``cond`` on a per-seed draw
    # runs both branches, and two gradient computations would cost twice a token-KD step.
    length = max(batch["tokens"].shape[1], batch["prompt_tokens"].shape[1] + objective.max_new_tokens)

    student = _student(graphdef, state.params, state, compute_dtype, quant)
    pad = default_pad_id(student.config)

    def sampled(_):
        new, n_new = generate_tokens(
            student,
            batch["prompt_tokens"],
            batch["prompt_lengths"],
            sample_key,
            stop_token_array(student.config.eos_token_ids),
            max_new_tokens=objective.max_new_tokens,
            sampling=objective.sampling,
            pad_id=pad,
        )
        return prompt_and_completion(batch["prompt_tokens"], batch["prompt_lengths"], new, n_new, pad_id=pad)

    if objective.student_fraction == 1:
        seqs = sampled(None)
    elif objective.student_fraction == 0:
        seqs = given
    else:
        if "attention_mask" not in given:  # the sampled rows carry one: both branches alike
            given = {**given, "attention_mask": jnp.ones(given["tokens"].shape, bool)}
        seqs = jax.lax.cond(
            use_student, lambda _: _pad_rows(sampled(None), length, pad), lambda _: _pad_rows(given, length, pad), None
        )
    loss, grads, n = grads_on(seqs)
    return apply_gradients(state, grads, tx), {"loss": loss, "tokens": n, "on_policy": use_student.astype(jnp.int32)}
