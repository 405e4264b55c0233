"""The combined training objective: a distillation term plus the label cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkd.losses import _common as c
from jkd.losses._hard import smoothed_cross_entropy


def distillation_objective(
    student_logits: jax.Array,
    labels: jax.Array,
    distillation_term: jax.Array,
    *,
    kd_weight: float | jax.Array,
    ce_weight: float | jax.Array,
    label_smoothing: float = 0.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Weighted sum of a distillation term and the label cross-entropy, per example.

    .. math::
        \ell = w_{kd}\, \ell_{kd} + w_{ce}\, \mathrm{CE}(\mathrm{softmax}(s), y)

    The distillation term is passed in already computed (by any loss of this module, e.g.
    ``soft_distillation_loss(s, t, temperature=4.0)``), so the objective works the same for
    losses that need the labels (DKD) and those that do not. Both weights are required and
    named for what they weigh: there is no ``alpha`` whose meaning flips between libraries.
    ``kd_weight=0`` gives the student trained alone; Hinton et al. use a small ``ce_weight``,
    the CIFAR recipes ``kd_weight=0.9, ce_weight=0.1`` (soft KD) or ``1, 1`` (DKD).

    Args:
      student_logits: ``[..., num_classes]`` floating point.
      labels: ``[...]`` integer ground-truth classes.
      distillation_term: ``[...]`` per-example distillation loss.
      kd_weight: weight of ``distillation_term`` (>= 0).
      ce_weight: weight of the label cross-entropy (>= 0).
      label_smoothing: ``epsilon`` in ``[0, 1]`` for the label cross-entropy.
      where: optional boolean ``[...]``; masked examples give 0 loss and 0 gradient.

    Returns:
      ``[...]`` float32 loss per example.

    Example:
      >>> s, t, y = jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.array([0, 2])
      >>> kd = soft_distillation_loss(s, t, temperature=4.0)
      >>> distillation_objective(s, y, kd, kd_weight=0.9, ce_weight=0.1).shape
      (2,)

    References:
      Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015 (weighted
      average of the soft and hard objectives). https://arxiv.org/abs/1503.02531
    """
    s = c.check_floating("student_logits", student_logits)
    s = s.astype(c.compute_dtype(s))
    batch_shape = s.shape[:-1]
    labels = c.check_labels(labels, batch_shape, s.shape[-1])
    kd = jnp.asarray(distillation_term)
    if not jnp.issubdtype(kd.dtype, jnp.floating):
        raise TypeError(f"distillation_term must be floating point; got dtype {kd.dtype}.")
    if kd.shape != batch_shape:
        raise ValueError(
            f"distillation_term must be per example with shape {batch_shape}; got "
            f"{kd.shape}. Do not reduce it before the objective."
        )
    kd = kd.astype(s.dtype)
    c.check_in_range("kd_weight", kd_weight, 0.0, float("inf"))
    c.check_in_range("ce_weight", ce_weight, 0.0, float("inf"))
    c.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    where = c.check_where(where, batch_shape)
    s, kd = c.mask_inputs(where, s, kd[..., None])
    ce = smoothed_cross_entropy(s, labels, label_smoothing)
    total = jnp.asarray(kd_weight, s.dtype) * kd[..., 0] + jnp.asarray(ce_weight, s.dtype) * ce
    return c.mask_output(where, total)
