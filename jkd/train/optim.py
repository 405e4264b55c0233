"""Optimizers and schedules from a small typed config."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import optax


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    """SGD with momentum and step decay, the CIFAR distillation recipe (CRD/DKD).

    ``learning_rate`` is multiplied by ``decay_factor`` at each epoch in ``decay_epochs``.
    """

    learning_rate: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_epochs: Sequence[int] = (150, 180, 210)
    decay_factor: float = 0.1


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """AdamW with linear warm-up then cosine decay to ``end_factor * learning_rate``."""

    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    end_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float | None = None  # added to the root of the second moment (None: optax's 1e-8)
    warmup_steps: int | None = None  # the warm-up in optimizer steps, instead of warmup_epochs


OptimizerConfig = SGDConfig | AdamWConfig


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_optimizer(config: OptimizerConfig) -> None:
    """Refuse settings that cannot train (NaN, negative or out-of-range values), naming them."""
    if not isinstance(config, (SGDConfig, AdamWConfig)):
        raise TypeError(f"optimizer config must be SGDConfig or AdamWConfig; got {type(config).__name__}.")
    name = type(config).__name__
    rules = {"learning_rate": (lambda v: v > 0, "> 0"), "weight_decay": (lambda v: v >= 0, ">= 0")}
    if isinstance(config, SGDConfig):
        rules.update(momentum=(lambda v: 0 <= v < 1, "in [0, 1)"), decay_factor=(lambda v: v > 0, "> 0"))
    else:
        rules.update(
            warmup_epochs=(lambda v: v >= 0, ">= 0"),
            end_factor=(lambda v: v >= 0, ">= 0"),
            b1=(lambda v: 0 <= v < 1, "in [0, 1)"),
            b2=(lambda v: 0 <= v < 1, "in [0, 1)"),
        )
    if isinstance(config, AdamWConfig) and config.eps is not None:
        rules.update(eps=(lambda v: v > 0, "> 0"))
    if isinstance(config, AdamWConfig) and config.warmup_steps is not None:
        w = config.warmup_steps
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise ValueError(f"{name}.warmup_steps (--warmup-steps) must be a whole number >= 0; got {w!r}.")
    for field, (ok, expected) in rules.items():
        v = getattr(config, field)
        if not (_finite(v) and ok(v)):
            flag = {"learning_rate": " (--lr)", "weight_decay": " (--weight-decay)"}.get(field, "")
            raise ValueError(f"{name}.{field}{flag} must be a finite number {expected}; got {v!r}.")


def decay_mask(params):
    """Weight decay on kernels only: not on biases, BatchNorm scales and offsets (ndim < 2)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _strict_safe(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run ``tx`` under standard dtype promotion.

    optax 0.2.8 computes Adam's bias correction as ``1 - b1**count`` with an int32 ``count``,
    which ``jax_numpy_dtype_promotion="strict"`` rejects. Only the optimizer runs under the
    standard rules; models and losses stay strict.
    """

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimizerConfig, *, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation for ``config``; schedules count optimizer steps."""
    if steps_per_epoch < 1 or total_steps < 1:
        raise ValueError(f"steps_per_epoch and total_steps must be >= 1; got {steps_per_epoch}, {total_steps}.")
    check_optimizer(config)
    if isinstance(config, SGDConfig):
        schedule = optax.piecewise_constant_schedule(
            config.learning_rate,
            {int(e * steps_per_epoch): config.decay_factor for e in config.decay_epochs},
        )
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
        )
    else:
        warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_epochs * steps_per_epoch)
        warmup = min(warmup, total_steps - 1)
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, warmup, total_steps, config.end_factor * config.learning_rate
        )
        tx = optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=1e-8 if config.eps is None else config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    return _strict_safe(tx)
