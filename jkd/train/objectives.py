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


@struct.dataclass
class StoredSoftKD:
    """Soft KD from stored top-k teacher targets (:mod:`jkd.train.stored`):
    ``kd_weight * T^2 KL(teacher_T over its top k || student_T) + ce_weight * CE(labels)``.

    ``teacher_targets`` is ``(values [B, k], indices [B, k])``; with ``k = num_classes`` this
    equals :class:`SoftKD` (see :func:`jkd.losses.topk_soft_distillation_loss`).
    """

    temperature: float | jax.Array = 4.0
    kd_weight: float | jax.Array = 0.9
    ce_weight: float | jax.Array = 0.1

    def __call__(self, student_logits, teacher_targets, labels) -> jax.Array:
        values, indices = teacher_targets
        kd = losses.topk_soft_distillation_loss(student_logits, values, indices, temperature=self.temperature)
        return losses.distillation_objective(
            student_logits, labels, kd, kd_weight=self.kd_weight, ce_weight=self.ce_weight)


def stack(objectives):
    """K objectives of one kind -> one objective whose leaves have a leading axis K."""
    return jax.tree.map(lambda *xs: jax.numpy.stack([jax.numpy.asarray(x, jax.numpy.float32) for x in xs]), *objectives)


@struct.dataclass
class FeatureKD:
    """A logit objective plus feature matching between named intermediate features.

    ``loss = base(s, t, y) + weight * sum_pairs feature_loss(student[a], teacher[b])``, with
    ``feature_loss`` :func:`jkd.losses.attention_transfer_loss` (Zagoruyko & Komodakis: NHWC
    maps of equal H, W, any channels; ``weight=1000`` in the paper's code) or
    :func:`jkd.losses.hint_loss` (FitNets; needs equal shapes, e.g. resnet8x4 vs resnet32x4
    stages — a learned regressor for unequal widths is not provided yet).

    The steps see ``needs_features`` and call both models with their features exposed.
    """

    base: object
    weight: float | jax.Array = 1000.0
    pairs: tuple[tuple[str, str], ...] = struct.field(pytree_node=False, default=(("stage3", "stage3"),))
    feature_loss: object = struct.field(pytree_node=False, default=losses.attention_transfer_loss)
    needs_features: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, student_logits, teacher_logits, labels, student_features, teacher_features) -> jax.Array:
        total = self.base(student_logits, teacher_logits, labels)
        for s_name, t_name in self.pairs:
            for name, feats, who in ((s_name, student_features, "student"), (t_name, teacher_features, "teacher")):
                if name not in feats:
                    raise ValueError(f"the {who} exposes no feature {name!r}; it has {sorted(feats)}.")
            fl = self.feature_loss
            s_f, t_f = student_features[s_name], teacher_features[t_name]
            per_example = fl(s_f, t_f, num_feature_axes=s_f.ndim - 1) if fl is losses.hint_loss else fl(s_f, t_f)
            total = total + self.weight * per_example
        return total


@struct.dataclass
class TeacherTemperature:
    """``base`` with the teacher's logits divided by ``temperature`` first: a teacher
    calibrated by temperature scaling (fitted on validation data) before distillation."""

    base: object
    temperature: float | jax.Array = 1.0

    def __call__(self, student_logits, teacher_logits, labels) -> jax.Array:
        return self.base(student_logits, teacher_logits / self.temperature, labels)



_FLAGS = {"temperature": "--temperature", "kd_weight": "--kd-weight", "ce_weight": "--ce-weight",
          "tckd_weight": "--tckd-weight", "nckd_weight": "--nckd-weight"}


def check_objective(objective) -> None:
    """Refuse hyper-parameters that cannot train, naming the field and its CLI flag.

    Temperatures must be finite and > 0; weights finite and >= 0; a KD objective needs a
    positive ``kd_weight`` or ``ce_weight``. Only plain numbers are checked (how configs and
    the CLI build objectives); stacked per-student arrays are built from checked ones.
    """
    import math

    name = type(objective).__name__
    if isinstance(objective, (TeacherTemperature, FeatureKD)):
        check_objective(objective.base)
    for field in ("temperature", "kd_weight", "ce_weight", "tckd_weight", "nckd_weight", "weight", "label_smoothing"):
        v = getattr(objective, field, None)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        ok = v > 0 if field == "temperature" else v >= 0
        if not (math.isfinite(v) and ok):
            flag = f" ({_FLAGS[field]})" if field in _FLAGS else ""
            expected = "> 0" if field == "temperature" else ">= 0"
            raise ValueError(f"{name}.{field}{flag} must be a finite number {expected}; got {v:g}.")
    if getattr(objective, "kd_weight", None) == 0 and getattr(objective, "ce_weight", None) == 0:
        raise ValueError(f"{name}: kd_weight and ce_weight are both 0, so nothing would be learned; give "
                         "one of them (--kd-weight, --ce-weight) a positive value.")
