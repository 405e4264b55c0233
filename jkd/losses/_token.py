"""Token-level divergences for distilling language models, and the token mean that is right.

Conventions: ``p = softmax(teacher_logits / T)``, ``q = softmax(student_logits / T)``, one
distribution per token over the vocabulary (last axis). Values are *not* rescaled by ``T^2``
(the usual LM setting is ``T = 1``; multiply by ``T^2`` for Hinton's scaling). Vocabulary entries
that are ``-inf`` in both (padding rows) contribute exactly 0, in value and gradient.

A divergence is a small frozen dataclass (``ForwardKL()``, ``GeneralizedJSD(beta=0.5)``, ...)
mapping log-probabilities to a per-token value; the public functions and the fused large-vocabulary
loss (:func:`~jkd.losses.projected_token_divergence`) take one, so the choice is a typed value, not
a string.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jkd.losses import _common as c


def _log_safe(x):
    """``log(x)`` where ``x > 0``, 0 elsewhere (callers mask those entries), gradient-safe."""
    pos = x > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, x, jnp.ones((), x.dtype))), jnp.zeros((), x.dtype))


def _kl(w, log_w, log_v):
    """``sum_i w_i (log w_i - log v_i)`` over the last axis, terms with ``w_i = 0`` exactly 0.

    ``log_w``/``log_v`` may hold ``-inf`` where ``w = 0``; both are replaced before the
    subtraction so that neither the value nor the gradient sees ``inf - inf`` or ``0 * inf``.
    """
    pos = w > 0
    zero = jnp.zeros((), w.dtype)
    diff = jnp.where(pos, log_w, zero) - jnp.where(pos, log_v, zero)
    return jnp.sum(jnp.where(pos, w * diff, zero), axis=-1)


def _check_unit_interval(divergence, field: str) -> None:
    value = getattr(divergence, field)
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{type(divergence).__name__}.{field} must be a number in [0, 1]; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ForwardKL:
    r"""``KL(p || q)``: mass-covering (Hinton et al.; torchtune's KD recipe)."""

    def __call__(self, log_p, log_q):
        return _kl(jnp.exp(log_p), log_p, log_q)


@dataclasses.dataclass(frozen=True)
class ReverseKL:
    r"""``KL(q || p)``: mode-seeking (MiniLLM, Gu et al. 2024)."""

    def __call__(self, log_p, log_q):
        return _kl(jnp.exp(log_q), log_q, log_p)


@dataclasses.dataclass(frozen=True)
class GeneralizedJSD:
    r"""Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as TRL computes it:

    .. math::
        \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p \,\|\, m) + (1-\beta)\,\mathrm{KL}(q \,\|\, m),
        \quad m = \beta p + (1 - \beta) q

    ``beta = 0.5`` is the symmetric JSD. Both ends are defined by their scaled limits, as TRL
    does: ``beta = 0`` is ``KL(p || q)`` (the limit of ``JSD_beta / beta``) and ``beta = 1`` is
    ``KL(q || p)`` (of ``JSD_beta / (1 - beta)``); in between the value is not rescaled.
    """

    beta: float = 0.5

    def __post_init__(self):
        _check_unit_interval(self, "beta")

    def __call__(self, log_p, log_q):
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        if self.beta == 0:
            return _kl(p, log_p, log_q)
        if self.beta == 1:
            return _kl(q, log_q, log_p)
        log_m = _log_safe(self.beta * p + (1 - self.beta) * q)
        return self.beta * _kl(p, log_p, log_m) + (1 - self.beta) * _kl(q, log_q, log_m)


@dataclasses.dataclass(frozen=True)
class SkewForwardKL:
    r"""DistiLLM's skew KL (Ko et al. 2024): ``KL(p || alpha p + (1 - alpha) q)``; ``alpha = 0``
    is the forward KL, ``alpha = 1`` gives 0. DistiLLM uses ``alpha = 0.1``."""

    alpha: float = 0.1

    def __post_init__(self):
        _check_unit_interval(self, "alpha")

    def __call__(self, log_p, log_q):
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        return _kl(p, log_p, _log_safe(self.alpha * p + (1 - self.alpha) * q))


@dataclasses.dataclass(frozen=True)
class SkewReverseKL:
    r"""DistiLLM's skew reverse KL: ``KL(q || (1 - alpha) p + alpha q)``; ``alpha = 0`` is the
    reverse KL, ``alpha = 1`` gives 0."""

    alpha: float = 0.1

    def __post_init__(self):
        _check_unit_interval(self, "alpha")

    def __call__(self, log_p, log_q):
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        return _kl(q, log_q, _log_safe((1 - self.alpha) * p + self.alpha * q))


@dataclasses.dataclass(frozen=True)
class TotalVariation:
    r"""``(1/2) sum_i |p_i - q_i|``, in [0, 1]."""

    def __call__(self, log_p, log_q):
        return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


Divergence = ForwardKL | ReverseKL | GeneralizedJSD | SkewForwardKL | SkewReverseKL | TotalVariation


def token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    divergence: Divergence = ForwardKL(),
    temperature: float | jax.Array = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""A divergence between the teacher's and the student's next-token distributions, per token.

    .. math::
        \ell_n = D\big(\mathrm{softmax}(t_n / T),\ \mathrm{softmax}(s_n / T)\big)

    with ``D`` one of :class:`ForwardKL`, :class:`ReverseKL`, :class:`GeneralizedJSD`,
    :class:`SkewForwardKL`, :class:`SkewReverseKL`, :class:`TotalVariation` (first argument the
    teacher's distribution ``p``, second the student's ``q``).

    Args:
      student_logits: ``[..., vocab]`` floating point (bf16/f16 upcast to f32).
      teacher_logits: ``[..., vocab]``, the same vocabulary: for padded vocabularies (Qwen's 151,936 vs
        152,064 rows), slice both to the rows the tokenizer uses (``jkd.data.vocab.shared_vocabulary``
        gives that count; ``TokenKD.vocab_size`` does the slicing in the train step). Entries ``-inf``
        in both contribute 0.
      divergence: the divergence (a frozen dataclass instance).
      temperature: ``T > 0``, a scalar or broadcastable to ``[...]``.
      where: optional boolean ``[...]``: the tokens to count (e.g. assistant tokens); masked
        tokens give 0 loss and exactly 0 gradient, whatever their logits hold.

    Returns:
      ``[...]`` float32 per-token values (not reduced: see :func:`token_mean`).

    Example:
      >>> s, t = jnp.zeros((2, 5, 11)), jnp.ones((2, 5, 11)).at[..., 0].set(3.0)
      >>> token_divergence(s, t, divergence=GeneralizedJSD(beta=0.5)).shape
      (2, 5)

    References:
      Agarwal et al. On-Policy Distillation of Language Models (GKD). ICLR 2024.
      https://arxiv.org/abs/2306.13649; Ko et al. DistiLLM. ICML 2024.
      https://arxiv.org/abs/2402.03898; Gu et al. MiniLLM. ICLR 2024.
      https://arxiv.org/abs/2306.08543
    """
    if not callable(divergence) or not dataclasses.is_dataclass(divergence):
        raise TypeError(
            f"divergence must be one of ForwardKL(), ReverseKL(), GeneralizedJSD(beta), "
            f"SkewForwardKL(alpha), SkewReverseKL(alpha), TotalVariation(); got {divergence!r}."
        )
    s, t = c.check_logits_pair(student_logits, teacher_logits)
    c.check_positive("temperature", temperature)
    where = c.check_where(where, s.shape[:-1])
    s, t = c.mask_inputs(where, s, t)
    temp = jnp.asarray(temperature, s.dtype)[..., None]
    log_q = jax.nn.log_softmax(s / temp, axis=-1)
    log_p = jax.nn.log_softmax(t / temp, axis=-1)
    return c.mask_output(where, divergence(log_p, log_q))


def token_mean(
    values: jax.Array, where: jax.Array | None = None, *, num_tokens: jax.Array | int | None = None
) -> jax.Array:
    r"""The token-weighted mean: ``sum(values[where]) / num_tokens``.

    .. math::
        L = \frac{1}{\max(N, 1)} \sum_{n\,:\,\mathrm{where}_n} \ell_n

    ``num_tokens`` defaults to ``where.sum()`` (all tokens without a mask). Under gradient
    accumulation or data parallelism pass the number of valid tokens of the *whole* step (every
    micro-batch, every device), so that the step's loss is the mean over its tokens and not a
    mean of per-batch or per-sequence means; masked or empty batches then contribute 0 (never
    ``0 / 0``).

    Args:
      values: ``[...]`` per-token values.
      where: optional boolean ``[...]``, the tokens to count.
      num_tokens: the denominator (>= 1 is enforced, so an all-masked step gives 0).

    Returns:
      ``[]`` float32: the mean over the counted tokens.

    Example:
      >>> token_mean(jnp.array([[1.0, 3.0], [5.0, 7.0]]), jnp.array([[True, True], [True, False]]))
      Array(3., dtype=float32)

    References:
      The normalisation issue it avoids: TRL's GKD and SFT trainers' per-batch means under gradient
      accumulation (huggingface/trl issues on loss normalisation with variable lengths).
    """
    values = jnp.asarray(values)
    dtype = c.compute_dtype(values)
    if where is None:
        total = jnp.sum(values.astype(dtype))
        count = values.size
    else:
        where = c.check_where(where, values.shape)
        total = jnp.sum(jnp.where(where, values.astype(dtype), jnp.zeros((), dtype)))
        count = jnp.sum(where, dtype=jnp.int32)
    n = count if num_tokens is None else num_tokens
    return total / jnp.maximum(jnp.asarray(n, dtype), 1)


def projected_token_divergence(
    student_hidden: jax.Array,
    student_weight: jax.Array,
    teacher_hidden: jax.Array,
    teacher_weight: jax.Array,
    *,
    divergence: Divergence = ForwardKL(),
    temperature: float = 1.0,
    where: jax.Array | None = None,
    num_tokens: jax.Array | int | None = None,
    labels: jax.Array | None = None,
    divergence_weight: float = 1.0,
    label_weight: float = 0.0,
    chunk_size: int = 1024,
) -> jax.Array:
    r"""The token mean of a divergence with both output projections fused in: ``[tokens, vocab]``
    logits exist for one chunk of tokens at a time, in the forward and the backward pass.

    .. math::
        L = \frac{1}{N} \sum_{n\,:\,\mathrm{where}_n} \Big[ w_D\, D\big(\mathrm{softmax}(W^t h^t_n / T),\
        \mathrm{softmax}(W^s h^s_n / T)\big) - w_y \log \mathrm{softmax}(W^s h^s_n)_{y_n} \Big]

    With ``labels`` and ``label_weight > 0``, the student's cross-entropy on the labels (at
    temperature 1) is mixed in within the same pass, as a token-KD step needs.

    The gradients with respect to the student's hidden states and output weight are formed in the
    same pass as the value (per chunk, by differentiating that chunk alone), so the backward pass
    only scales them: the plain loss's matrix products, no recomputation, no ``[tokens, vocab]``
    residual. The teacher is frozen: its inputs get zero gradients.

    Args:
      student_hidden: ``[..., d_s]`` the student's final hidden states (``Decoder.hidden_states``).
      student_weight: ``[vocab, d_s]`` its output projection (``Decoder.output_weight()``).
      teacher_hidden: ``[..., d_t]``, the same leading shape.
      teacher_weight: ``[vocab, d_t]``, the same vocabulary.
      divergence: as in :func:`token_divergence`.
      temperature: ``T > 0`` (a Python number).
      where: optional boolean ``[...]``: the tokens that count; the others give exactly 0 gradient.
      num_tokens: the denominator ``N`` (default ``where.sum()``; pass the whole step's count
        under gradient accumulation or across devices, see :func:`token_mean`).
      labels: optional int ``[...]``: the next tokens, for the cross-entropy term.
      divergence_weight, label_weight: ``w_D`` and ``w_y`` (Python numbers).
      chunk_size: tokens per chunk, counted over the whole batch: a chunk holds
        ``max(1, chunk_size // B)`` positions of each of the ``B`` sequences (the leading axes), so
        a batch split over devices stays split and each device projects its own rows. With
        ``where``, each sequence's counted positions are moved to its front and chunks past the
        longest count are skipped (no products for prompts and padding). Across devices the
        output weight's gradient is summed once per chunk: with many devices, larger chunks.

    Returns:
      ``[]`` float32: the mean over the counted tokens.

    Example:
      >>> h, w = jnp.ones((2, 6, 4)), jnp.zeros((50, 4)).at[0].set(1.0)
      >>> projected_token_divergence(h, w, h, 2 * w, divergence=ReverseKL(), chunk_size=4).shape
      ()

    References:
      Agarwal et al. 2024 (GKD), https://arxiv.org/abs/2306.13649. Fusing the output projection into
      a chunked loss: Hsu et al. Liger Kernel, 2024, https://arxiv.org/abs/2410.10989; Levanter's
      blockwise cross-entropy.
    """
    hs = c.check_floating("student_hidden", student_hidden)
    ws = c.check_floating("student_weight", student_weight)
    ht = c.check_floating("teacher_hidden", teacher_hidden)
    wt = c.check_floating("teacher_weight", teacher_weight)
    if ws.ndim != 2 or wt.ndim != 2 or ws.shape[1] != hs.shape[-1] or wt.shape[1] != ht.shape[-1]:
        raise ValueError(
            "weights must be [vocab, d] with d the hidden size; got student hidden "
            f"{hs.shape} with weight {ws.shape}, teacher hidden {ht.shape} with weight {wt.shape}."
        )
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ ({ws.shape[0]} vs {wt.shape[0]} rows); pass the "
            "rows both use (jkd.data.vocab.shared_vocabulary gives the count; TokenKD.vocab_size slices "
            "them in the train step)."
        )
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"student_hidden and teacher_hidden need the same leading shape; got {hs.shape} and {ht.shape}."
        )
    if not dataclasses.is_dataclass(divergence):
        raise TypeError(f"divergence must be a divergence instance such as ForwardKL(); got {divergence!r}.")
    return _fused_entry(
        hs,
        ws,
        (ht,),
        (wt,),
        _DenseTeacher(divergence),
        temperature,
        where,
        num_tokens,
        labels,
        divergence_weight,
        label_weight,
        chunk_size,
    )


def _fused_entry(
    hs,
    ws,
    t_rows,
    t_globs,
    teacher,
    temperature,
    where,
    num_tokens,
    labels,
    divergence_weight,
    label_weight,
    chunk_size,
):
    """Checks shared by the fused losses, rows flattened into chunks, then the custom-VJP pass."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a positive Python number; got {temperature!r}.")
    batch_shape = hs.shape[:-1]
    where = c.check_where(where, batch_shape)
    for name, w in (("divergence_weight", divergence_weight), ("label_weight", label_weight)):
        if not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"{name} must be a non-negative Python number; got {w!r}.")
    if label_weight > 0:
        if labels is None:
            raise ValueError("label_weight > 0 needs labels (the next tokens, int [...]).")
        labels = c.check_labels(labels, batch_shape, ws.shape[0])
    else:
        labels = jnp.zeros(batch_shape, jnp.int32)
    layout = _ChunkLayout.of(batch_shape, chunk_size, where)
    mask = jnp.ones(batch_shape, bool) if where is None else where
    count = jnp.sum(mask, dtype=jnp.int32) if num_tokens is None else num_tokens
    dtype = c.compute_dtype(hs, ws)
    denom = jnp.maximum(jnp.asarray(count, dtype), 1)
    weights = (float(divergence_weight), float(label_weight))
    loss, _ = _fused(
        layout.prep(hs),
        ws,
        tuple(layout.prep(x) for x in t_rows),
        t_globs,
        layout.prep(mask, False),
        layout.prep(labels),
        denom,
        teacher,
        float(temperature),
        weights,
        dtype,
    )
    return loss


@dataclasses.dataclass(frozen=True)
class _ChunkLayout:
    """How the tokens ``[..., T]`` of a fused loss are cut into chunks: along the last axis
    (positions), every sequence of the leading axes in every chunk, so a batch split over devices
    stays split (each device works on its own rows of each chunk; nothing is gathered).

    Where a mask is given, each sequence's counted positions are moved to its front first (a
    stable per-row sort, local to the row), so the chunks past the longest count hold no counted
    token and the pass skips them: prompts and padding cost no vocabulary products.
    """

    batch_ndim: int  # the batch shape's rank
    rows: int  # the sequences (the product of the leading axes; 1 for a flat [T])
    length: int  # T
    per_row: int  # positions of each sequence per chunk
    order: jax.Array | None  # [rows, T] the sort (None: no mask, natural order)

    @classmethod
    def of(cls, batch_shape, chunk_size, where):
        rows = math.prod(batch_shape[:-1]) if len(batch_shape) > 1 else 1
        length = batch_shape[-1] if batch_shape else 1
        per_row = min(max(1, chunk_size // rows), max(length, 1))
        order = None
        if where is not None:
            order = jnp.argsort(~where.reshape(rows, length), axis=-1, stable=True).astype(jnp.int32)
        return cls(len(batch_shape), rows, length, per_row, order)

    def prep(self, x, fill=0):
        """``[..., T, *rest]`` (the batch shape, then per-token features) ->
        ``[chunks, rows, per_row, *rest]``, the last chunk padded with ``fill``."""
        rest = x.shape[self.batch_ndim :]
        x = x.reshape((self.rows, self.length) + rest)
        if self.order is not None:
            x = jnp.take_along_axis(x, self.order.reshape(self.order.shape + (1,) * len(rest)), axis=1)
        chunks = -(-self.length // self.per_row)
        pad = chunks * self.per_row - self.length
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * len(rest), constant_values=fill)
        return jnp.moveaxis(x.reshape((self.rows, chunks, self.per_row) + rest), 1, 0)


@dataclasses.dataclass(frozen=True)
class _DenseTeacher:
    """The teacher as hidden states ``(h,)`` per row and its output weight ``(W,)``."""

    divergence: Divergence

    def prepare(self, rows, globs, mask, temp, dtype):
        (ht,), (wt,) = rows, globs
        ht = jnp.where(mask[:, None], ht, jnp.zeros((), ht.dtype)).astype(wt.dtype)
        return jax.nn.log_softmax(_mm(ht, wt, "td,vd->tv", dtype) / temp, axis=-1)

    def term(self, log_p, z, temp):
        return self.divergence(log_p, jax.nn.log_softmax(z / temp, axis=-1))


@dataclasses.dataclass(frozen=True)
class _TopKTeacher:
    """The teacher as its top-k log-probabilities and their ids per row (stored outputs): the
    forward KL from the teacher's distribution renormalised over its k tokens."""

    def prepare(self, rows, globs, mask, temp, dtype):
        values, ids = rows
        values = jnp.where(mask[:, None], values.astype(dtype), jnp.zeros((), dtype))
        return jax.nn.log_softmax(values / temp, axis=-1), ids

    def term(self, aux, z, temp):
        log_p, ids = aux
        log_q = jnp.take_along_axis(jax.nn.log_softmax(z / temp, axis=-1), ids, axis=-1)
        return _kl(jnp.exp(log_p), log_p, log_q)


def _mm(a, b, spec, dtype):
    """A product in the operands' own dtype (bfloat16 stays bfloat16 on the MXU / tensor cores)
    with ``dtype`` (float32) accumulation and result."""
    return jnp.einsum(spec, a, b, preferred_element_type=dtype)


def _fused_pass(hs, ws, t_rows, t_globs, mask, labels, denom, teacher, temp, weights, dtype):
    """Loss sum / denom and its gradients w.r.t. ``hs`` (per chunk) and ``ws``, in one scan over
    the chunks of :class:`_ChunkLayout` (each ``[rows, per_row, ...]``); a chunk with no counted
    token is skipped (``lax.cond``: no products, zero gradient).

    The products run in the inputs' dtype with float32 accumulation; the softmaxes, the
    divergence and the accumulated weight gradient are float32.
    """
    zero = jnp.zeros((), dtype)
    w_div, w_label = weights

    def flat(x):
        return x.reshape((-1,) + x.shape[2:])

    def chunk(dws, hc, mc, yc, rows):
        hc = jnp.where(mc[:, None], hc, jnp.zeros((), hc.dtype))  # garbage in masked rows never enters
        aux = teacher.prepare(rows, t_globs, mc, temp, dtype) if w_div > 0 else None

        def chunk_loss(z):  # z: the student's un-tempered logits of the chunk
            per_row = jnp.zeros(z.shape[:1], dtype)
            if w_div > 0:
                per_row = per_row + w_div * teacher.term(aux, z, temp)
            if w_label > 0:
                log_q1 = jax.nn.log_softmax(z, axis=-1)
                per_row = per_row - w_label * jnp.take_along_axis(log_q1, yc[:, None], axis=-1)[:, 0]
            return jnp.sum(jnp.where(mc, per_row, zero)) / denom

        value, vjp = jax.vjp(chunk_loss, _mm(hc, ws, "td,vd->tv", dtype))
        (dz,) = vjp(jnp.ones((), dtype))
        dh = _mm(dz.astype(ws.dtype), ws, "tv,vd->td", dtype)
        return dws + _mm(dz.astype(hc.dtype), hc, "tv,td->vd", dtype), (value, dh.astype(hc.dtype))

    def one(dws, args):
        hc, mc, yc, rows = args
        shape = hc.shape
        hc, mc, yc, rows = flat(hc), flat(mc), flat(yc), tuple(flat(x) for x in rows)

        def skip(dws):
            return dws, (zero, jnp.zeros_like(hc))

        dws, (value, dh) = jax.lax.cond(jnp.any(mc), lambda d: chunk(d, hc, mc, yc, rows), skip, dws)
        return dws, (value, dh.reshape(shape))

    dws, (values, dhs) = jax.lax.scan(one, jnp.zeros(ws.shape, dtype), (hs, mask, labels, t_rows))
    return jnp.sum(values), dhs, dws.astype(ws.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _fused(hs, ws, t_rows, t_globs, mask, labels, denom, teacher, temp, weights, dtype):
    loss, dhs, dws = _fused_pass(hs, ws, t_rows, t_globs, mask, labels, denom, teacher, temp, weights, dtype)
    return loss, (dhs, dws)


def _fused_fwd(hs, ws, t_rows, t_globs, mask, labels, denom, teacher, temp, weights, dtype):
    loss, dhs, dws = _fused_pass(hs, ws, t_rows, t_globs, mask, labels, denom, teacher, temp, weights, dtype)
    return (loss, (dhs, dws)), (dhs, dws, t_rows, t_globs, denom)


def _no_gradient(tree):
    """Zero cotangents for the teacher's float arrays, none for integer ids."""
    return jax.tree.map(lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else None, tree)


def _fused_bwd(teacher, temp, weights, dtype, res, cotangents):
    dhs, dws, t_rows, t_globs, denom = res
    g = cotangents[0].astype(dtype)  # the auxiliary output carries no gradient
    return (
        (dhs.astype(dtype) * g).astype(dhs.dtype),
        (dws.astype(dtype) * g).astype(dws.dtype),
        _no_gradient(t_rows),
        _no_gradient(t_globs),
        None,
        None,
        jnp.zeros_like(denom),
    )


_fused.defvjp(_fused_fwd, _fused_bwd)


def projected_topk_kl(
    student_hidden: jax.Array,
    student_weight: jax.Array,
    teacher_topk_logprobs: jax.Array,
    teacher_topk_ids: jax.Array,
    *,
    temperature: float = 1.0,
    where: jax.Array | None = None,
    num_tokens: jax.Array | int | None = None,
    labels: jax.Array | None = None,
    divergence_weight: float = 1.0,
    label_weight: float = 0.0,
    chunk_size: int = 1024,
) -> jax.Array:
    r"""The token mean of the forward KL from a *stored* teacher (its top-k log-probabilities per
    token) to the student, with the student's output projection fused in (bounded memory).

    .. math::
        L = \frac{1}{N} \sum_{n\,:\,\mathrm{where}_n} \Big[ w_D \sum_{j=1}^{k} \tilde p_{nj}
        \big(\log \tilde p_{nj} - \log q_{n, i_{nj}}\big) - w_y \log \mathrm{softmax}(W^s h^s_n)_{y_n} \Big]

    where ``p~`` is the teacher's distribution renormalised over its ``k`` stored tokens (at
    temperature ``T``: ``softmax(logprobs / T)``) and ``q = softmax(W^s h^s / T)`` over the whole
    vocabulary, so mass the student puts outside the teacher's top-k is penalised. With ``k`` equal
    to the vocabulary it is :func:`projected_token_divergence` with ``ForwardKL()``.

    Args:
      student_hidden: ``[..., d]``; student_weight: ``[vocab, d]``.
      teacher_topk_logprobs: ``[..., k]`` floating point (bfloat16 storage is fine).
      teacher_topk_ids: ``[..., k]`` int, ids into the student's vocabulary.
      temperature, where, num_tokens, labels, divergence_weight, label_weight, chunk_size: as in
        :func:`projected_token_divergence`.

    Returns:
      ``[]`` float32: the mean over the counted tokens.

    Example:
      >>> h, w = jnp.ones((2, 6, 4)), jnp.zeros((50, 4)).at[0].set(1.0)
      >>> lp, ids = jnp.log(jnp.full((2, 6, 3), 1 / 3)), jnp.tile(jnp.arange(3), (2, 6, 1))
      >>> projected_topk_kl(h, w, lp, ids, chunk_size=4).shape
      ()

    References:
      Storing a teacher's top-k outputs: Raman et al. 2023, "For distillation, tokens are not all
      you need"; sparse logit sampling, Anshumann et al. 2025, https://arxiv.org/abs/2503.16870.
    """
    hs = c.check_floating("student_hidden", student_hidden)
    ws = c.check_floating("student_weight", student_weight)
    vals = c.check_floating("teacher_topk_logprobs", teacher_topk_logprobs)
    ids = jnp.asarray(teacher_topk_ids)
    if ws.ndim != 2 or ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"student_weight must be [vocab, d] with d = {hs.shape[-1]}; got {ws.shape}.")
    if vals.shape != ids.shape or vals.shape[:-1] != hs.shape[:-1]:
        raise ValueError(
            f"teacher_topk_logprobs {vals.shape} and teacher_topk_ids {ids.shape} must both be "
            f"[..., k] with [...] = {hs.shape[:-1]} (the student's tokens)."
        )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"teacher_topk_ids must be integer ids; got dtype {ids.dtype}.")
    c.check_labels(ids, ids.shape, ws.shape[0])  # ids inside the student's vocabulary (when concrete)
    return _fused_entry(
        hs,
        ws,
        (vals, ids.astype(jnp.int32)),
        (),
        _TopKTeacher(),
        temperature,
        where,
        num_tokens,
        labels,
        divergence_weight,
        label_weight,
        chunk_size,
    )
