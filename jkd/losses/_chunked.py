"""Soft distillation over very large vocabularies, a chunk of rows at a time."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp

from jkd.losses import _common as c
from jkd.losses._token import projected_token_divergence


def chunked_soft_distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 1024,
    where: jax.Array | None = None,
) -> jax.Array:
    r""":func:`soft_distillation_loss` computed ``chunk_size`` rows at a time, per example.

    .. math::
        \ell = T^2 \, \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big)

    Same value and gradient (w.r.t. both logits) as the plain loss; the ``[rows, num_classes]``
    float32 intermediates (upcast inputs, log-probabilities, probabilities) exist for one chunk
    at a time: a custom VJP keeps only the inputs as residuals and computes the gradients
    ``T (q - p)`` and ``T p (log p - log q - KL)`` chunk by chunk, in the inputs' dtype. Use it
    for token-level distillation with large vocabularies (e.g. 8,192 tokens x 32,768 classes).
    The temperature gets no gradient here.

    Args:
      student_logits: ``[..., num_classes]`` floating point (bf16 stays bf16 outside the chunk).
      teacher_logits: ``[..., num_classes]``, same shape.
      temperature: ``T > 0``, a scalar or broadcastable to ``[...]``.
      chunk_size: rows per chunk (the last chunk is padded).
      where: optional boolean ``[...]``; masked rows give 0 loss and 0 gradient.

    Returns:
      ``[...]`` float32 loss per example.

    Example:
      >>> s, t = jnp.zeros((3, 7, 50)), jnp.ones((3, 7, 50))
      >>> chunked_soft_distillation_loss(s, t, temperature=2.0, chunk_size=8).shape
      (3, 7)

    References:
      Hinton et al. 2015, https://arxiv.org/abs/1503.02531; chunking with rematerialisation:
      Chen et al. Training Deep Nets with Sublinear Memory Cost. 2016.
      https://arxiv.org/abs/1604.06174
    """
    s = c.check_floating("student_logits", student_logits)
    t = c.check_floating("teacher_logits", teacher_logits)
    if s.shape != t.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape [..., num_classes]; got "
            f"{s.shape} and {t.shape}."
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    c.check_positive("temperature", temperature)
    batch_shape = s.shape[:-1]
    where = c.check_where(where, batch_shape)
    dtype = c.compute_dtype(s, t)
    rows = math.prod(batch_shape)
    n_chunks = max(1, -(-rows // chunk_size))
    pad = n_chunks * chunk_size - rows
    temp = jnp.broadcast_to(jnp.asarray(temperature, dtype), batch_shape).reshape(rows)
    mask = jnp.ones((rows,), bool) if where is None else where.reshape(rows)

    def prep(x, fill):
        x = x.reshape((rows,) + x.shape[len(batch_shape) :])
        if pad:  # a copy only when the rows do not divide into chunks
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape((n_chunks, chunk_size) + x.shape[1:])

    loss = _chunked_kd(prep(s, 0), prep(t, 0), prep(temp, 1), prep(mask, False), dtype)
    return loss.reshape(-1)[:rows].reshape(batch_shape)


def _chunk_terms(sc, tc, tempc, mc, dtype):
    """Per-row log-probabilities of one chunk, masked rows replaced by zeros (finite)."""
    zero = jnp.zeros((), dtype)
    sc = jnp.where(mc[:, None], sc.astype(dtype), zero)
    tc = jnp.where(mc[:, None], tc.astype(dtype), zero)
    log_q = jax.nn.log_softmax(sc / tempc[:, None], axis=-1)
    log_p = jax.nn.log_softmax(tc / tempc[:, None], axis=-1)
    return log_p, log_q


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_kd(s, t, temp, mask, dtype):
    def one(args):
        sc, tc, tempc, mc = args
        log_p, log_q = _chunk_terms(sc, tc, tempc, mc, dtype)
        kl = c.kl_from_log_probs(log_p, log_q)
        return jnp.where(mc, tempc**2 * kl, jnp.zeros((), dtype))

    return jax.lax.map(one, (s, t, temp, mask))


def _chunked_kd_fwd(s, t, temp, mask, dtype):
    # Residuals are the inputs only: every chunk's intermediates are recomputed backward.
    return _chunked_kd(s, t, temp, mask, dtype), (s, t, temp, mask)


def _chunked_kd_bwd(dtype, res, g):
    s, t, temp, mask = res

    def one(args):
        sc, tc, tempc, mc, gc = args
        log_p, log_q = _chunk_terms(sc, tc, tempc, mc, dtype)
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        gc = jnp.where(mc, gc.astype(dtype), jnp.zeros((), dtype))[:, None]
        # d/ds [T^2 KL(p||q)] = T (q - p);  d/dt = T p (log p - log q - KL)
        ds = tempc[:, None] * (q - p) * gc
        diff = jnp.where(p > 0, log_p - jnp.where(p > 0, log_q, 0), 0)
        kl = jnp.sum(p * diff, axis=-1, keepdims=True)
        dt = tempc[:, None] * p * (diff - kl) * gc
        return ds.astype(sc.dtype), dt.astype(tc.dtype)

    ds, dt = jax.lax.map(one, (s, t, temp, mask, g))
    return ds, dt, jnp.zeros_like(temp), None


_chunked_kd.defvjp(_chunked_kd_fwd, _chunked_kd_bwd)


def projected_soft_distillation_loss(
    student_hidden: jax.Array,
    student_projection: jax.Array,
    teacher_hidden: jax.Array,
    teacher_projection: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> jax.Array:
    r"""Deprecated: :func:`projected_token_divergence` is the one fused-projection loss (masks, any
    divergence, the labels' cross-entropy in the same pass). This is it with ``[d, num_classes]``
    projections, the forward KL and Hinton's ``T^2`` factor.

    .. math::
        L = \frac{1}{N} \sum_{n} T^2 \, \mathrm{KL}\big(\mathrm{softmax}(h^t_n W^t / T)
        \,\|\, \mathrm{softmax}(h^s_n W^s / T)\big)

    Args:
      student_hidden: ``[..., d_student]`` floating point.
      student_projection: ``[d_student, num_classes]`` (the student's output layer, no bias).
      teacher_hidden: ``[..., d_teacher]``, the same leading shape.
      teacher_projection: ``[d_teacher, num_classes]``.
      temperature: ``T > 0`` (a Python number).
      chunk_size: tokens per chunk (as :func:`projected_token_divergence` counts them).

    Returns:
      ``[]`` float32: the mean loss over all rows.

    Example:
      >>> import warnings
      >>> hs, ws = jnp.ones((6, 4)), jnp.zeros((4, 50))
      >>> with warnings.catch_warnings():
      ...     warnings.simplefilter("ignore", DeprecationWarning)
      ...     projected_soft_distillation_loss(hs, ws, hs, ws, temperature=2.0, chunk_size=4).shape
      ()

    References:
      Hinton et al. 2015, https://arxiv.org/abs/1503.02531. Fusing the output projection into a
      chunked loss: Hsu et al. Liger Kernel, 2024, https://arxiv.org/abs/2410.10989.
    """
    warnings.warn(
        "jkd.losses.projected_soft_distillation_loss is deprecated: use "
        "projected_token_divergence(student_hidden, student_projection.T, teacher_hidden, "
        "teacher_projection.T, temperature=T) * T**2 (weights [vocab, d]; masks and other "
        "divergences too).",
        DeprecationWarning,
        stacklevel=2,
    )
    ws = c.check_floating("student_projection", student_projection)
    wt = c.check_floating("teacher_projection", teacher_projection)
    hs_d, ht_d = jnp.shape(student_hidden)[-1], jnp.shape(teacher_hidden)[-1]
    if ws.ndim != 2 or wt.ndim != 2 or ws.shape[0] != hs_d or wt.shape[0] != ht_d or ws.shape[1] != wt.shape[1]:
        raise ValueError(
            "projections must be [d, num_classes] with d the hidden size and the same num_classes; got student "
            f"hidden {jnp.shape(student_hidden)} x projection {ws.shape}, teacher hidden {jnp.shape(teacher_hidden)} "
            f"x projection {wt.shape}."
        )
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a positive Python number; got {temperature!r}.")
    return temperature**2 * projected_token_divergence(
        student_hidden, ws.T, teacher_hidden, wt.T, temperature=temperature, chunk_size=chunk_size
    )
