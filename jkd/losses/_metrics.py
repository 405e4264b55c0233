"""Teacher-student agreement metrics as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkd.losses import _common as c
from jkd.losses._soft import tempered_kl


def top1_agreement(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Whether student and teacher predict the same top-1 class, per example (1.0 or 0.0).

    .. math::
        a = \mathbb{1}\big[\arg\max_k s_k = \arg\max_k t_k\big]

    Args:
      student_logits: ``[..., num_classes]``.
      teacher_logits: ``[..., num_classes]``, same shape.
      where: optional boolean ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` float32; its mean over unmasked examples is the agreement rate.

    Example:
      >>> top1_agreement(jnp.eye(3), jnp.eye(3)[::-1])
      Array([0., 1., 0.], dtype=float32)

    References:
      Stanton et al. Does Knowledge Distillation Really Work? NeurIPS 2021 (agreement as a
      measure of fidelity). https://arxiv.org/abs/2106.05945
    """
    s, t = c.check_logits_pair(student_logits, teacher_logits)
    where = c.check_where(where, s.shape[:-1])
    agree = (jnp.argmax(s, axis=-1) == jnp.argmax(t, axis=-1)).astype(s.dtype)
    return c.mask_output(where, agree)


def teacher_student_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""KL divergence from the teacher's to the student's predictive distribution, per example.

    .. math::
        \mathrm{KL}\big(\mathrm{softmax}(t/T) \,\|\, \mathrm{softmax}(s/T)\big)

    A fidelity metric: unlike :func:`soft_distillation_loss` it has no ``T^2`` factor.

    Args:
      student_logits: ``[..., num_classes]``.
      teacher_logits: ``[..., num_classes]``, same shape.
      temperature: ``T > 0`` (1 to compare the models as they predict).
      where: optional boolean ``[...]``; masked examples give 0.

    Returns:
      ``[...]`` float32 KL in nats per example.

    Example:
      >>> teacher_student_kl(jnp.zeros((1, 4)), jnp.zeros((1, 4)))
      Array([0.], dtype=float32)

    References:
      Stanton et al. Does Knowledge Distillation Really Work? NeurIPS 2021.
      https://arxiv.org/abs/2106.05945
    """
    s, t = c.check_logits_pair(student_logits, teacher_logits)
    c.check_positive("temperature", temperature)
    where = c.check_where(where, s.shape[:-1])
    s, t = c.mask_inputs(where, s, t)
    return c.mask_output(where, tempered_kl(s, t, jnp.asarray(temperature, s.dtype)))
