"""Decoupled knowledge distillation (DKD): target-class and non-target-class parts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkd.losses import _common as c


def _binary_log_probs(z: jax.Array, onehot: jax.Array) -> jax.Array:
    """``[log p_target, log (1 - p_target)]`` of ``softmax(z)``, computed in log space. -> ``[..., 2]``.

    ``log(1 - p_y)`` is ``logsumexp`` over the other classes minus ``logsumexp`` over all,
    which stays exact when ``p_y`` rounds to 1 in float32.
    """
    lse_all = jax.nn.logsumexp(z, axis=-1)
    log_p_target = jnp.sum(jnp.where(onehot, z, 0), axis=-1) - lse_all
    log_p_rest = jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, z), axis=-1) - lse_all
    return jnp.stack([log_p_target, log_p_rest], axis=-1)


def decoupled_distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    tckd_weight: float | jax.Array = 1.0,
    nckd_weight: float | jax.Array = 8.0,
    temperature: float | jax.Array = 4.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Decoupled knowledge distillation (DKD), per example.

    .. math::
        \ell = T^2 \big(\alpha\, \mathrm{KL}(b^t \| b^s) + \beta\, \mathrm{KL}(\hat p^t \| \hat p^s)\big)

    with ``p = softmax(z / T)``, ``b = [p_y, 1 - p_y]`` the binary target-vs-rest
    probabilities (TCKD) and ``p_hat = softmax`` over the non-target classes only (NCKD),
    ``alpha = tckd_weight`` and ``beta = nckd_weight``.

    Args:
      student_logits: ``[..., num_classes]`` floating point, ``num_classes >= 2``.
      teacher_logits: ``[..., num_classes]``, same shape.
      labels: ``[...]`` integer ground-truth classes in ``[0, num_classes)``.
      tckd_weight: ``alpha``, weight of the target-class part.
      nckd_weight: ``beta``, weight of the non-target-class part (the paper uses 1-8).
      temperature: ``T > 0``, scalar or broadcastable to ``[...]``.
      where: optional boolean ``[...]``; masked examples give 0 loss and 0 gradient.

    Returns:
      ``[...]`` float32 loss per example.

    Example:
      >>> decoupled_distillation_loss(jnp.zeros((2, 5)), jnp.ones((2, 5)), jnp.array([0, 4])).shape
      (2,)

    References:
      Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation. CVPR 2022.
      https://arxiv.org/abs/2203.08679
    """
    s, t = c.check_logits_pair(student_logits, teacher_logits)
    num_classes = s.shape[-1]
    if num_classes < 2:
        raise ValueError(f"DKD needs num_classes >= 2 (a target and a non-target part); got {num_classes}.")
    labels = c.check_labels(labels, s.shape[:-1], num_classes)
    c.check_positive("temperature", temperature)
    where = c.check_where(where, s.shape[:-1])
    s, t = c.mask_inputs(where, s, t)
    temp = jnp.asarray(temperature, s.dtype)
    s, t = s / temp[..., None], t / temp[..., None]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)

    tckd = c.kl_from_log_probs(_binary_log_probs(t, onehot), _binary_log_probs(s, onehot))
    non_target = lambda z: jax.nn.log_softmax(jnp.where(onehot, -jnp.inf, z), axis=-1)  # noqa: E731
    nckd = c.kl_from_log_probs(non_target(t), non_target(s))
    alpha = jnp.asarray(tckd_weight, s.dtype)
    beta = jnp.asarray(nckd_weight, s.dtype)
    return c.mask_output(where, temp**2 * (alpha * tckd + beta * nckd))
