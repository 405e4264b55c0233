"""Soft-target distillation: Hinton's temperature KD and the classic MSE/CE blend."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkd.losses import _common as c


def tempered_kl(s: jax.Array, t: jax.Array, temperature: jax.Array) -> jax.Array:
    """``KL(softmax(t/T) || softmax(s/T))`` over the last axis; ``temperature`` is ``[...]``-broadcastable."""
    temp = temperature[..., None]
    return c.kl_from_log_probs(jax.nn.log_softmax(t / temp, axis=-1), jax.nn.log_softmax(s / temp, axis=-1))


def soft_distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Soft-target knowledge distillation loss, per example.

    .. math::
        \ell = T^2 \, \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big)

    The ``T^2`` factor keeps the gradient's scale independent of ``T``: the gradient with
    respect to the student logits is ``T * (softmax(s/T) - softmax(t/T))``.

    Args:
      student_logits: ``[..., num_classes]`` floating point (bf16/f16 are upcast to f32).
      teacher_logits: ``[..., num_classes]``, same shape as ``student_logits``. Classes that
        do not exist (padded vocabulary) may be ``-inf`` in both.
      temperature: ``T > 0``, a scalar or an array broadcastable to ``[...]`` (e.g. one
        temperature per vmapped student).
      where: optional boolean ``[...]``; masked examples give 0 loss and 0 gradient.

    Returns:
      ``[...]`` float32 loss per example (not reduced).

    Example:
      >>> s = jnp.array([[1.0, 2.0, 0.5]]); t = jnp.array([[0.5, 3.0, 0.0]])
      >>> soft_distillation_loss(s, t, temperature=4.0).shape
      (1,)

    References:
      Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015.
      https://arxiv.org/abs/1503.02531
    """
    s, t = c.check_logits_pair(student_logits, teacher_logits)
    c.check_positive("temperature", temperature)
    where = c.check_where(where, s.shape[:-1])
    s, t = c.mask_inputs(where, s, t)
    temp = jnp.asarray(temperature, s.dtype)
    return c.mask_output(where, temp**2 * tempered_kl(s, t, temp))


def blended_soft_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    mse_weight: float | jax.Array = 0.5,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Blend of squared error and cross-entropy between soft targets, per example.

    .. math::
        \ell = w \sum_k (p_k - q_k)^2 + (1 - w) \Big(-\sum_k p_k \log q_k\Big),
        \quad p = \mathrm{softmax}(t/T),\; q = \mathrm{softmax}(s/T)

    The cross-entropy part is not a divergence: at ``s == t`` the loss equals
    ``(1 - w) * H(p)``, the teacher's entropy (a constant for the student), and its gradient
    is zero. Use :func:`soft_distillation_loss` for a loss that is 0 at equality.

    Args:
      student_logits: ``[..., num_classes]`` floating point.
      teacher_logits: ``[..., num_classes]``, same shape.
      temperature: ``T > 0``, scalar or broadcastable to ``[...]``.
      mse_weight: ``w`` in ``[0, 1]``: weight of the squared-error part.
      where: optional boolean ``[...]``; masked examples give 0 loss and 0 gradient.

    Returns:
      ``[...]`` float32 loss per example.

    Example:
      >>> blended_soft_loss(jnp.zeros((2, 5)), jnp.ones((2, 5)), temperature=2.0).shape
      (2,)

    References:
      The MSE + cross-entropy blend of soft targets used in early distillation tutorials;
      the soft targets follow Hinton et al. 2015, https://arxiv.org/abs/1503.02531
    """
    s, t = c.check_logits_pair(student_logits, teacher_logits)
    c.check_positive("temperature", temperature)
    c.check_in_range("mse_weight", mse_weight, 0.0, 1.0)
    where = c.check_where(where, s.shape[:-1])
    s, t = c.mask_inputs(where, s, t)
    temp = jnp.asarray(temperature, s.dtype)[..., None]
    log_p = jax.nn.log_softmax(t / temp, axis=-1)
    log_q = jax.nn.log_softmax(s / temp, axis=-1)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    mse = jnp.sum(jnp.square(p - q), axis=-1)
    ce = -jnp.sum(c.xlogy_safe(p, log_q), axis=-1)
    w = jnp.asarray(mse_weight, s.dtype)
    return c.mask_output(where, w * mse + (1 - w) * ce)
