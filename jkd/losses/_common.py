"""Input checks and numerically safe building blocks shared by the loss modules.

Checks run at trace time: shapes and dtypes are static under ``jit``, so a wrong shape
fails on the first call with a message naming the argument. Values (temperature, label
range) are checked only when they are concrete, i.e. outside ``jit``/``vmap``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def compute_dtype(*arrays: Array) -> jnp.dtype:
    """float64 when any input is float64 (x64 mode), else float32: bf16/f16 are upcast."""
    if any(jnp.dtype(a.dtype) == jnp.float64 for a in arrays):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def check_floating(name: str, x: Any) -> Array:
    """Return ``x`` as an array, or raise TypeError if it is not a floating-point array."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float32, bfloat16, float16, ...); "
            f"got dtype {x.dtype}. Cast integer logits with .astype(jnp.float32)."
        )
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one axis [..., num_classes]; got a scalar.")
    return x


def broadcast_shape_or_none(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(jnp.broadcast_shapes(*shapes))
    except ValueError:
        return None


def check_logits_pair(student_logits: Any, teacher_logits: Any) -> tuple[Array, Array]:
    """Check two ``[..., num_classes]`` logit arrays; broadcast their leading axes; upcast.

    Broadcasting lets ``[K, B, C]`` logits of K students meet one teacher's ``[B, C]``.
    """
    s = check_floating("student_logits", student_logits)
    t = check_floating("teacher_logits", teacher_logits)
    shape = broadcast_shape_or_none(s.shape, t.shape)
    if s.shape[-1] != t.shape[-1] or shape is None:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape [..., num_classes] "
            f"(or leading axes that broadcast); got student_logits {s.shape} and "
            f"teacher_logits {t.shape}."
        )
    dtype = compute_dtype(s, t)
    return (jnp.broadcast_to(s, shape).astype(dtype), jnp.broadcast_to(t, shape).astype(dtype))


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_positive(name: str, value: Any) -> None:
    """Raise ValueError if a concrete ``value`` is not > 0 everywhere (skipped when traced)."""
    if _is_concrete(value):
        v = np.asarray(value)
        if v.size and not np.all(v > 0):
            raise ValueError(f"{name} must be > 0; got {value!r}.")


def check_in_range(name: str, value: Any, low: float, high: float) -> None:
    """Raise ValueError if a concrete ``value`` lies outside ``[low, high]``."""
    if _is_concrete(value):
        v = np.asarray(value)
        if v.size and not np.all((v >= low) & (v <= high)):
            raise ValueError(f"{name} must lie in [{low}, {high}]; got {value!r}.")


def check_labels(labels: Any, batch_shape: tuple[int, ...], num_classes: int) -> Array:
    """Check integer labels broadcastable to ``batch_shape`` with values in ``[0, num_classes)``."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices of shape {batch_shape}; got dtype "
            f"{labels.dtype}. Pass probabilities to a *_probs argument instead."
        )
    if broadcast_shape_or_none(labels.shape, batch_shape) != batch_shape:
        raise ValueError(
            f"labels must have shape {batch_shape} (the logits' shape without the class "
            f"axis) or broadcast to it; got {labels.shape}."
        )
    if _is_concrete(labels) and labels.size:
        concrete = np.asarray(labels)  # numpy: jnp ops on a constant inside jit would trace
        lo, hi = int(concrete.min()), int(concrete.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes; found values in [{lo}, {hi}]."
            )
    return jnp.broadcast_to(labels, batch_shape)


def check_where(where: Any, batch_shape: tuple[int, ...]) -> Array | None:
    """Check a boolean mask broadcastable to ``batch_shape``; return it broadcast."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask of shape {batch_shape}; got dtype {where.dtype}.")
    if broadcast_shape_or_none(where.shape, batch_shape) != batch_shape:
        raise ValueError(
            f"where must have shape {batch_shape} (one entry per example, the logits' shape "
            f"without the class axis) or broadcast to it; got {where.shape}."
        )
    return jnp.broadcast_to(where, batch_shape)


def mask_inputs(where: Array | None, *arrays: Array, feature_ndim: int = 1) -> tuple[Array, ...]:
    """Replace masked examples by zeros *before* the loss is computed.

    Masking the output alone is not enough: a NaN or inf in a masked example would still
    poison the gradient through ``jnp.where``. Zeroed inputs make the masked branch finite.
    """
    if where is None:
        return arrays
    m = where.reshape(where.shape + (1,) * feature_ndim)
    return tuple(jnp.where(m, a, jnp.zeros((), a.dtype)) for a in arrays)


def mask_output(where: Array | None, loss: Array) -> Array:
    """Zero the per-example loss where the mask is False."""
    if where is None:
        return loss
    return jnp.where(where, loss, jnp.zeros((), loss.dtype))


def xlogy_safe(p: Array, log_q: Array) -> Array:
    """``p * log_q`` with the convention 0 * log(anything) = 0, gradient-safe.

    Needed where logits hold ``-inf`` (masked vocabulary): there ``p = 0`` and
    ``log_q = -inf``, and the naive product is NaN in the value and in the gradient.
    """
    positive = p > 0
    safe_log_q = jnp.where(positive, log_q, jnp.zeros((), log_q.dtype))
    return jnp.where(positive, p * safe_log_q, jnp.zeros((), p.dtype))


def kl_from_log_probs(log_p: Array, log_q: Array, axis: int = -1) -> Array:
    """``KL(p || q) = sum p (log p - log q)`` over ``axis``, from log-probabilities."""
    p = jnp.exp(log_p)
    return jnp.sum(xlogy_safe(p, log_p) - xlogy_safe(p, log_q), axis=axis)
