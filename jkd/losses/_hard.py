"""Cross-entropy against integer targets: labels, or the teacher's argmax (hard KD)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkd.losses import _common as c


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing) -> jax.Array:
    """``-sum_k y_k log softmax(logits)_k`` with ``y = (1-e) onehot + e/K`` over the K finite
    classes (classes whose logit is ``-inf`` get no smoothing mass). ``[..., C] -> [...]``."""
    log_q = jax.nn.log_softmax(logits, axis=-1)
    num_classes = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    valid = (logits > -jnp.inf).astype(logits.dtype)
    eps = jnp.asarray(label_smoothing, logits.dtype)
    target = (1 - eps) * onehot + eps * valid / jnp.sum(valid, axis=-1, keepdims=True)
    return -jnp.sum(c.xlogy_safe(target, log_q), axis=-1)


def cross_entropy_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Cross-entropy with integer labels and optional label smoothing, per example.

    .. math::
        \ell = -\sum_k y_k \log \mathrm{softmax}(z)_k, \quad
        y = (1 - \epsilon)\,\mathrm{onehot}(\text{label}) + \epsilon / K

    Args:
      logits: ``[..., num_classes]`` floating point.
      labels: ``[...]`` integers in ``[0, num_classes)``.
      label_smoothing: ``epsilon`` in ``[0, 1]``, spread over the ``K`` classes whose logit
        is finite.
      where: optional boolean ``[...]``; masked examples give 0 loss and 0 gradient.

    Returns:
      ``[...]`` float32 loss per example.

    Example:
      >>> cross_entropy_loss(jnp.zeros((2, 4)), jnp.array([0, 3])).shape
      (2,)

    References:
      Label smoothing: Szegedy et al. Rethinking the Inception Architecture. 2016.
      https://arxiv.org/abs/1512.00567
    """
    z = c.check_floating("logits", logits)
    z = z.astype(c.compute_dtype(z))
    labels = c.check_labels(labels, z.shape[:-1], z.shape[-1])
    c.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    where = c.check_where(where, z.shape[:-1])
    (z,) = c.mask_inputs(where, z)
    return c.mask_output(where, smoothed_cross_entropy(z, labels, label_smoothing))


def hard_distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    label_smoothing: float = 0.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Hard distillation: cross-entropy against the teacher's top-1 class, per example.

    .. math::
        \ell = \mathrm{CE}\big(\mathrm{softmax}(s),\; y_t\big), \quad y_t = \arg\max_k t_k

    No gradient flows into the teacher (the argmax is piecewise constant).

    Args:
      student_logits: ``[..., num_classes]`` floating point.
      teacher_logits: ``[..., num_classes]``, same shape.
      label_smoothing: ``epsilon`` in ``[0, 1]`` applied to the teacher's one-hot label
        (DeiT uses 0.1 for its hard-distillation token).
      where: optional boolean ``[...]``; masked examples give 0 loss and 0 gradient.

    Returns:
      ``[...]`` float32 loss per example.

    Example:
      >>> hard_distillation_loss(jnp.zeros((3, 10)), jnp.eye(3, 10)).shape
      (3,)

    References:
      Touvron et al. Training data-efficient image transformers & distillation through
      attention (DeiT). ICML 2021. https://arxiv.org/abs/2012.12877
    """
    s, t = c.check_logits_pair(student_logits, teacher_logits)
    c.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    where = c.check_where(where, s.shape[:-1])
    s, t = c.mask_inputs(where, s, t)
    teacher_labels = jnp.argmax(jax.lax.stop_gradient(t), axis=-1)
    return c.mask_output(where, smoothed_cross_entropy(s, teacher_labels, label_smoothing))
