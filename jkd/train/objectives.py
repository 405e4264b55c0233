"""Training objectives as callable pytrees: ``objective(student_logits, teacher_logits, labels)``.

Their hyper-parameters are pytree leaves, so K objectives stacked on a leading axis (one per
student: temperatures, weights) are ``vmap``-ed with the students they train. Each returns the
per-example loss ``[B]``; any callable with that signature can be passed to the steps instead.
"""

from __future__ import annotations

import jax
from flax import struct

from jkd import losses


@struct.dataclass
class CrossEntropy:
    """Labels only (teacher training, the student alone); the teacher's logits are ignored."""

    label_smoothing: float = struct.field(pytree_node=False, default=0.0)

    def __call__(self, student_logits, teacher_logits, labels) -> jax.Array:
        return losses.cross_entropy_loss(student_logits, labels, label_smoothing=self.label_smoothing)


@struct.dataclass
class SoftKD:
    """Hinton et al.: ``kd_weight * T^2 KL(teacher_T || student_T) + ce_weight * CE(labels)``."""

    temperature: float | jax.Array = 4.0
    kd_weight: float | jax.Array = 0.9
    ce_weight: float | jax.Array = 0.1

    def __call__(self, student_logits, teacher_logits, labels) -> jax.Array:
        kd = losses.soft_distillation_loss(student_logits, teacher_logits, temperature=self.temperature)
        return losses.distillation_objective(
            student_logits, labels, kd, kd_weight=self.kd_weight, ce_weight=self.ce_weight)


@struct.dataclass
class HardKD:
    """DeiT hard distillation: ``kd_weight * CE(teacher argmax) + ce_weight * CE(labels)``."""

    kd_weight: float | jax.Array = 0.5
    ce_weight: float | jax.Array = 0.5
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)

    def __call__(self, student_logits, teacher_logits, labels) -> jax.Array:
        kd = losses.hard_distillation_loss(student_logits, teacher_logits, label_smoothing=self.label_smoothing)
        return losses.distillation_objective(
            student_logits, labels, kd, kd_weight=self.kd_weight, ce_weight=self.ce_weight)


@struct.dataclass
class DKD:
    """Zhao et al. 2022: ``kd_weight * DKD(alpha, beta, T) + ce_weight * CE(labels)``."""

    tckd_weight: float | jax.Array = 1.0
    nckd_weight: float | jax.Array = 8.0
    temperature: float | jax.Array = 4.0
    kd_weight: float | jax.Array = 1.0
    ce_weight: float | jax.Array = 1.0

    def __call__(self, student_logits, teacher_logits, labels) -> jax.Array:
        kd = losses.decoupled_distillation_loss(
            student_logits, teacher_logits, labels, tckd_weight=self.tckd_weight,
            nckd_weight=self.nckd_weight, temperature=self.temperature)
        return losses.distillation_objective(
            student_logits, labels, kd, kd_weight=self.kd_weight, ce_weight=self.ce_weight)


def stack(objectives):
    """K objectives of one kind -> one objective whose leaves have a leading axis K."""
    return jax.tree.map(lambda *xs: jax.numpy.stack([jax.numpy.asarray(x, jax.numpy.float32) for x in xs]), *objectives)
