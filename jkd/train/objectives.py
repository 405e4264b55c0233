"""Training objectives as callable pytrees: ``objective(student_logits, teacher_logits, labels)``.

Their hyper-parameters are pytree leaves, so K objectives stacked on a leading axis (one per
student: temperatures, weights) are ``vmap``-ed with the students they train. Each returns the
per-example loss ``[B]``; any callable with that signature can be passed to the steps instead.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jkd import losses


class _Wrapper:
    """An objective around a ``base`` objective: the base's schedule (DKD's warm-up) gets the
    train step's ``step`` through it (``**step`` in ``__call__``)."""

    @property
    def takes_step(self) -> bool:
        return bool(getattr(self.base, "takes_step", False))


@struct.dataclass
class CrossEntropy:
    """Labels only (teacher training, the student alone); the teacher's logits are ignored."""

    label_smoothing: float = struct.field(pytree_node=False, default=0.0)
    reads_teacher: ClassVar[bool] = False  # trained without a teacher

    def __call__(self, student_logits, teacher_logits, labels) -> jax.Array:
        return losses.cross_entropy_loss(student_logits, labels, label_smoothing=self.label_smoothing)


@struct.dataclass
class SoftKD:
    """Hinton et al.: ``kd_weight * T^2 KL(teacher_T || student_T) + ce_weight * CE(labels)``."""

    temperature: float | jax.Array = 4.0
    kd_weight: float | jax.Array = 0.9
    ce_weight: float | jax.Array = 0.1
    standardize: bool | None = struct.field(pytree_node=False, default=None)  # logit standardisation (Sun et al. 2024)

    def __call__(self, student_logits, teacher_logits, labels) -> jax.Array:
        s, t = _standardized(self.standardize, student_logits, teacher_logits)
        kd = losses.soft_distillation_loss(s, t, temperature=self.temperature)
        return losses.distillation_objective(
            student_logits, labels, kd, kd_weight=self.kd_weight, ce_weight=self.ce_weight
        )


def _standardized(on: bool | None, student_logits, teacher_logits):
    """Both models' logits z-scored (the KD term only; the label term reads the raw logits)."""
    if not on:
        return student_logits, teacher_logits
    return losses.standardize_logits(student_logits), losses.standardize_logits(teacher_logits)


@struct.dataclass
class FunctionMatching:
    """Beyer et al. 2022, "consistent and patient" teaching: ``T^2 KL(teacher_T || student_T)``
    on the view both models see, with no label term (the paper's ``T = 1``).

    The labels are never read, so the view may mix images (``mixup_alpha`` of a
    :class:`~jkd.jobs.image.Distillation`): the teacher's output on the mixed image is the target.
    """

    temperature: float | jax.Array = 1.0
    reads_labels: ClassVar[bool] = False

    def __call__(self, student_logits, teacher_logits, labels) -> jax.Array:
        return losses.soft_distillation_loss(student_logits, teacher_logits, temperature=self.temperature)


@struct.dataclass
class HardKD:
    """DeiT hard distillation: ``kd_weight * CE(teacher argmax) + ce_weight * CE(labels)``."""

    kd_weight: float | jax.Array = 0.5
    ce_weight: float | jax.Array = 0.5
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)

    def __call__(self, student_logits, teacher_logits, labels) -> jax.Array:
        kd = losses.hard_distillation_loss(student_logits, teacher_logits, label_smoothing=self.label_smoothing)
        return losses.distillation_objective(
            student_logits, labels, kd, kd_weight=self.kd_weight, ce_weight=self.ce_weight
        )


@struct.dataclass
class DKD:
    """Zhao et al. 2022: ``kd_weight * ramp * DKD(alpha, beta, T) + ce_weight * CE(labels)``.

    ``ramp = min(step / warmup_steps, 1)``: the paper's warm-up of the distillation weight
    (20 epochs in its CIFAR recipe; None or 0: none). The experiment converts ``warmup_epochs`` to
    steps (:func:`per_epoch`); the step passes its ``step`` (``takes_step``).
    """

    tckd_weight: float | jax.Array = 1.0
    nckd_weight: float | jax.Array = 8.0
    temperature: float | jax.Array = 4.0
    kd_weight: float | jax.Array = 1.0
    ce_weight: float | jax.Array = 1.0
    # None (not 0) for "off": a field added at None leaves the run folders of earlier configs resumable.
    warmup_epochs: float | jax.Array | None = None
    steps_per_epoch: int | None = struct.field(pytree_node=False, default=None)
    standardize: bool | None = struct.field(pytree_node=False, default=None)  # logit standardisation (Sun et al. 2024)
    takes_step: ClassVar[bool] = True

    def __call__(self, student_logits, teacher_logits, labels, *, step=None) -> jax.Array:
        s, t = _standardized(self.standardize, student_logits, teacher_logits)
        kd = losses.decoupled_distillation_loss(
            s, t, labels, tckd_weight=self.tckd_weight, nckd_weight=self.nckd_weight, temperature=self.temperature
        )
        weight = self.kd_weight
        w = self.warmup_epochs
        if isinstance(w, (int, float)) and w > 0 and not (self.steps_per_epoch and step is not None):
            raise ValueError(
                f"DKD.warmup_epochs={w:g} needs the epoch length (objectives.per_epoch(objective, "
                "steps_per_epoch)) and the train step's `step`."
            )
        if w is not None and step is not None and self.steps_per_epoch:
            warmup = jnp.asarray(w, jnp.float32) * self.steps_per_epoch
            ramp = jnp.where(
                warmup > 0, jnp.minimum(jnp.asarray(step, jnp.float32) / jnp.maximum(warmup, 1.0), 1.0), 1.0
            )
            weight = weight * ramp
        return losses.distillation_objective(student_logits, labels, kd, kd_weight=weight, ce_weight=self.ce_weight)


def per_epoch(objective, steps_per_epoch: int):
    """``objective`` told the epoch length (objectives with a schedule in epochs: DKD's warm-up)."""
    if hasattr(objective, "steps_per_epoch"):
        objective = objective.replace(steps_per_epoch=int(steps_per_epoch))
    if hasattr(objective, "base"):
        objective = objective.replace(base=per_epoch(objective.base, steps_per_epoch))
    return objective


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
            student_logits, labels, kd, kd_weight=self.kd_weight, ce_weight=self.ce_weight
        )


def stack(objectives):
    """K objectives of one kind -> one objective whose leaves have a leading axis K."""
    return jax.tree.map(lambda *xs: jax.numpy.stack([jax.numpy.asarray(x, jax.numpy.float32) for x in xs]), *objectives)


@struct.dataclass
class FeatureKD(_Wrapper):
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

    def __call__(self, student_logits, teacher_logits, labels, student_features, teacher_features, **step) -> jax.Array:
        total = self.base(student_logits, teacher_logits, labels, **step)
        for pair in self.pairs:
            fl = self.feature_loss
            s_f, t_f = _paired(pair, student_features, teacher_features)
            per_example = fl(s_f, t_f, num_feature_axes=s_f.ndim - 1) if fl is losses.hint_loss else fl(s_f, t_f)
            total = total + self.weight * per_example
        return total


def _feature(features: dict, name: str, who: str):
    if name not in features:
        raise ValueError(f"the {who} exposes no feature {name!r}; it has {sorted(features)}.")
    return features[name]


def _paired(pair: tuple[str, str], student_features: dict, teacher_features: dict):
    """The student's and the teacher's features named by ``pair``."""
    return _feature(student_features, pair[0], "student"), _feature(teacher_features, pair[1], "teacher")


@struct.dataclass
class RKD(_Wrapper):
    """Park et al. 2019: ``base + distance_weight * RKD-D + angle_weight * RKD-A`` on a pair of
    features (default: what each model's head reads, ``pooled``; widths may differ)."""

    base: object = CrossEntropy()
    distance_weight: float | jax.Array = 25.0
    angle_weight: float | jax.Array = 50.0
    pair: tuple[str, str] = struct.field(pytree_node=False, default=("pooled", "pooled"))
    batch_level: ClassVar[bool] = True  # relations over the whole batch
    needs_features: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, student_logits, teacher_logits, labels, student_features, teacher_features, **step) -> jax.Array:
        s, t = _paired(self.pair, student_features, teacher_features)
        return (
            self.base(student_logits, teacher_logits, labels, **step)
            + self.distance_weight * losses.rkd_distance_loss(s, t)
            + self.angle_weight * losses.rkd_angle_loss(s, t)
        )


@struct.dataclass
class SP(_Wrapper):
    """Tung & Mori 2019: ``base + weight * SP`` on a pair of features (any shapes)."""

    base: object = CrossEntropy()
    weight: float | jax.Array = 3000.0
    pair: tuple[str, str] = struct.field(pytree_node=False, default=("pooled", "pooled"))
    batch_level: ClassVar[bool] = True  # relations over the whole batch
    needs_features: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, student_logits, teacher_logits, labels, student_features, teacher_features, **step) -> jax.Array:
        s, t = _paired(self.pair, student_features, teacher_features)
        return self.base(
            student_logits, teacher_logits, labels, **step
        ) + self.weight * losses.similarity_preserving_loss(s, t)


@struct.dataclass
class CRD(_Wrapper):
    """Tian et al. 2020: ``base + weight * CRD`` with learned heads and a memory of negatives.

    Two linear heads (trained with the student, never exported) map the student's and the
    teacher's ``pair`` features to ``embed_dim``; :func:`jkd.losses.contrastive_representation_loss`
    contrasts them against the rest of the (global) batch and a first-in-first-out memory of
    the last ``memory_size`` embeddings of each model. The heads and the memory live in the
    train state's ``aux`` (:meth:`init_aux`); the step returns the memory with this batch added.
    """

    base: object = CrossEntropy()
    weight: float | jax.Array = 0.8
    temperature: float | jax.Array = 0.07
    embed_dim: int = struct.field(pytree_node=False, default=128)
    memory_size: int = struct.field(pytree_node=False, default=4096)
    pair: tuple[str, str] = struct.field(pytree_node=False, default=("pooled", "pooled"))
    batch_level: ClassVar[bool] = True  # relations over the whole batch
    needs_features: bool = struct.field(pytree_node=False, default=True)
    has_aux: ClassVar[bool] = True

    def init_aux(self, key: jax.Array, student_features: dict, teacher_features: dict) -> dict:
        """``{"params": heads, "state": memory}`` for features shaped like these (arrays or
        ``ShapeDtypeStruct``), heads initialised as flax's ``Linear`` (LeCun normal)."""
        init = jax.nn.initializers.lecun_normal()
        s_x, t_x = _paired(self.pair, student_features, teacher_features)
        widths = {"student": math.prod(s_x.shape[1:]), "teacher": math.prod(t_x.shape[1:])}
        keys = dict(zip(("student", "teacher"), jax.random.split(key)))
        params = {
            w: {
                "kernel": init(keys[w], (widths[w], self.embed_dim), jnp.float32),
                "bias": jnp.zeros((self.embed_dim,), jnp.float32),
            }
            for w in widths
        }
        memory = {
            "student": jnp.zeros((self.memory_size, self.embed_dim), jnp.float32),
            "teacher": jnp.zeros((self.memory_size, self.embed_dim), jnp.float32),
            "valid": jnp.zeros((self.memory_size,), bool),
            "next": jnp.zeros((), jnp.int32),
        }
        return {"params": params, "state": memory}

    def __call__(
        self, student_logits, teacher_logits, labels, student_features, teacher_features, aux_params, aux_state, **step
    ):
        def embed(who, x):
            x = x.reshape(x.shape[0], -1).astype(jnp.float32)
            return x @ aux_params[who]["kernel"] + aux_params[who]["bias"]

        s_x, t_x = _paired(self.pair, student_features, teacher_features)
        s, t = embed("student", s_x), embed("teacher", t_x)
        crd = losses.contrastive_representation_loss(
            s,
            t,
            student_memory=aux_state["student"],
            teacher_memory=aux_state["teacher"],
            memory_valid=aux_state["valid"],
            temperature=self.temperature,
        )
        rows = (aux_state["next"] + jnp.arange(s.shape[0])) % self.memory_size
        new_state = {
            "student": aux_state["student"].at[rows].set(jax.lax.stop_gradient(s)),
            "teacher": aux_state["teacher"].at[rows].set(jax.lax.stop_gradient(t)),
            "valid": aux_state["valid"].at[rows].set(True),
            "next": (aux_state["next"] + s.shape[0]) % self.memory_size,
        }
        return self.base(student_logits, teacher_logits, labels, **step) + self.weight * crd, new_state


@struct.dataclass
class TeacherTemperature(_Wrapper):
    """``base`` with the teacher's logits divided by ``temperature`` first: a teacher
    calibrated by temperature scaling (fitted on validation data) before distillation."""

    base: object
    temperature: float | jax.Array = 1.0

    def __call__(self, student_logits, teacher_logits, labels, **step) -> jax.Array:
        return self.base(student_logits, teacher_logits / self.temperature, labels, **step)


_FLAGS = {
    "temperature": "--temperature",
    "kd_weight": "--kd-weight",
    "ce_weight": "--ce-weight",
    "tckd_weight": "--tckd-weight",
    "nckd_weight": "--nckd-weight",
    "warmup_epochs": "--kd-warmup-epochs",
    "weight": "--feature-weight",
}


def check_objective(objective) -> None:
    """Refuse hyper-parameters that cannot train, naming the field and its CLI flag.

    Temperatures must be finite and > 0; weights finite and >= 0; a KD objective needs a
    positive ``kd_weight`` or ``ce_weight``. Only plain numbers are checked (how configs and
    the CLI build objectives); stacked per-student arrays are built from checked ones.
    """

    name = type(objective).__name__
    if hasattr(objective, "base"):
        check_objective(objective.base)
    for field in (
        "temperature",
        "kd_weight",
        "ce_weight",
        "tckd_weight",
        "nckd_weight",
        "weight",
        "label_smoothing",
        "distance_weight",
        "angle_weight",
        "warmup_epochs",
    ):
        v = getattr(objective, field, None)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        ok = v > 0 if field == "temperature" else v >= 0
        if not (math.isfinite(v) and ok):
            flag = f" ({_FLAGS[field]})" if field in _FLAGS else ""
            expected = "> 0" if field == "temperature" else ">= 0"
            raise ValueError(f"{name}.{field}{flag} must be a finite number {expected}; got {v:g}.")
    if getattr(objective, "kd_weight", None) == 0 and getattr(objective, "ce_weight", None) == 0:
        raise ValueError(
            f"{name}: kd_weight and ce_weight are both 0, so nothing would be learned; give "
            "one of them (--kd-weight, --ce-weight) a positive value."
        )
