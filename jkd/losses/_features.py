"""Feature-based distillation: FitNets hints and attention transfer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkd.losses import _common as c


def _check_features(student_features, teacher_features, num_feature_axes: int):
    s = c.check_floating("student_features", student_features)
    t = c.check_floating("teacher_features", teacher_features)
    if not isinstance(num_feature_axes, int) or num_feature_axes < 1:
        raise ValueError(f"num_feature_axes must be a positive int; got {num_feature_axes!r}.")
    if s.ndim < num_feature_axes or t.ndim < num_feature_axes:
        raise ValueError(
            f"features need at least num_feature_axes={num_feature_axes} axes; got "
            f"student_features {s.shape} and teacher_features {t.shape}."
        )
    dtype = c.compute_dtype(s, t)
    return s.astype(dtype), t.astype(dtype)


def hint_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    num_feature_axes: int = 1,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""FitNets hint loss: mean squared error between matched features, per example.

    .. math::
        \ell = \frac{1}{D} \sum_{j=1}^{D} \big(r(u)_j - v_j\big)^2

    ``r(u)``, the student's regressor output, is computed by the caller (a learnable
    1x1 conv or dense layer that maps the student's width to the teacher's). The paper
    writes ``1/2 * sum``; the mean used here (as in common reference implementations) keeps
    the scale independent of the layer size, and differs from it by the constant ``D / 2``.

    Args:
      student_features: ``[..., *feature_shape]``, already mapped to the teacher's shape.
      teacher_features: same shape as ``student_features``.
      num_feature_axes: how many trailing axes form one example's feature (3 for NHWC
        maps ``[B, H, W, C]``, 1 for vectors or per-token features ``[B, L, D]``).
      where: optional boolean ``[...]`` over the leading axes.

    Returns:
      ``[...]`` float32 loss per example (the leading axes).

    Example:
      >>> hint_loss(jnp.zeros((2, 4, 4, 8)), jnp.ones((2, 4, 4, 8)), num_feature_axes=3)
      Array([1., 1.], dtype=float32)

    References:
      Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015.
      https://arxiv.org/abs/1412.6550
    """
    s, t = _check_features(student_features, teacher_features, num_feature_axes)
    if s.shape != t.shape:
        raise ValueError(
            "student_features and teacher_features must have the same shape (map the student "
            f"with a regressor first); got {s.shape} and {t.shape}."
        )
    batch_shape = s.shape[: s.ndim - num_feature_axes]
    where = c.check_where(where, batch_shape)
    s, t = c.mask_inputs(where, s, t, feature_ndim=num_feature_axes)
    axes = tuple(range(s.ndim - num_feature_axes, s.ndim))
    return c.mask_output(where, jnp.mean(jnp.square(s - t), axis=axes))


def attention_map(features: jax.Array, *, p: float = 2.0) -> jax.Array:
    r"""Normalised spatial attention map of NHWC features: ``[..., H, W, C] -> [..., H*W]``.

    .. math::
        Q = \mathrm{vec}\Big(\frac{1}{C}\sum_c |A_c|^p\Big), \qquad \hat Q = Q / \|Q\|_2
    """
    q = jnp.mean(jnp.abs(features) ** p, axis=-1)
    q = q.reshape(q.shape[:-2] + (-1,))
    # max() inside the sqrt: an all-zero map (e.g. a masked example) has a finite gradient.
    sq_norm = jnp.sum(jnp.square(q), axis=-1, keepdims=True)
    return q / jnp.sqrt(jnp.maximum(sq_norm, 1e-24))


def attention_transfer_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    p: float = 2.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Attention transfer: distance between normalised spatial attention maps, per example.

    .. math::
        \ell = \frac{1}{HW} \sum_{j} \big(\hat Q^s_j - \hat Q^t_j\big)^2,
        \qquad \hat Q = \frac{Q}{\|Q\|_2},\; Q = \frac{1}{C}\sum_c |A_c|^p

    Channel counts of student and teacher may differ; spatial sizes must match. This is the
    authors' implementation (mean of squared differences, used with weight ``beta=1000``);
    the paper's eq. 2 writes the unsquared L2 norm of the same difference.

    Args:
      student_features: ``[..., H, W, C_s]`` NHWC activations.
      teacher_features: ``[..., H, W, C_t]`` with the same ``[..., H, W]``.
      p: exponent of the attention map (the paper uses 2).
      where: optional boolean ``[...]``.

    Returns:
      ``[...]`` float32 loss per example.

    Example:
      >>> attention_transfer_loss(jnp.ones((2, 8, 8, 16)), jnp.ones((2, 8, 8, 64)))
      Array([0., 0.], dtype=float32)

    References:
      Zagoruyko, Komodakis. Paying More Attention to Attention. ICLR 2017.
      https://arxiv.org/abs/1612.03928
    """
    s, t = _check_features(student_features, teacher_features, 3)
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            "student_features and teacher_features must agree on [..., H, W] (channels may "
            f"differ); got {s.shape} and {t.shape}."
        )
    c.check_positive("p", p)
    batch_shape = s.shape[:-3]
    where = c.check_where(where, batch_shape)
    s, t = c.mask_inputs(where, s, t, feature_ndim=3)
    diff = attention_map(s, p=p) - attention_map(t, p=p)
    return c.mask_output(where, jnp.mean(jnp.square(diff), axis=-1))
