"""BatchNorm whose training-mode reductions run as matrix-vector products on the CPU.

XLA's CPU backend reduces an activation over its batch and spatial axes ~20x slower than it
multiplies it by a vector of ones (64 x 32 x 32 x 64 floats: 11.5 ms against 0.5 ms on a 2-core
machine; no XLA flag changes that; ``benchmarks/batchnorm.py``).
Training-mode BatchNorm does four such reductions per layer (mean and variance forward; the sums
of ``g`` and ``g * x_hat`` backward), which made them 40% of a resnet8x4 train step.
:func:`batch_norm_train` computes the same function with a hand-written backward whose every
reduction is :func:`channel_sum`: a ``ones @ x`` product on the CPU, a plain ``jnp.sum`` on every
other platform
(``lax.platform_dependent`` picks at lowering time, so one jitted function serves all).

:class:`BatchNorm` is ``flax.nnx.BatchNorm`` with that training path. Its variables, running
statistics update and evaluation path are flax's own, so checkpoints and exports are unchanged;
configurations the fast path does not cover (a mask, ``axis_index_groups``, features on another
axis, a non-float32 dtype, no scale or bias) fall back to flax's implementation. Under ``pmap``
(an ``axis_name``) the fast path ``psum``-s its statistics and backward reductions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _dot_sum(x2d: jax.Array) -> jax.Array:
    # The rows are split first (a free reshape, the row axis stays major): ones [R/k] . x [R/k, k, C],
    # then the k partial sums of each channel added. The wider product runs ~2x faster than k = 1
    # for C <= 256 (65536 x 64: 0.5 ms vs 1.15 ms at k = 64). Rows sharded over explicit mesh axes
    # are not split: R/k need not divide evenly into the shards.
    rows, c = x2d.shape
    spec = getattr(jax.typeof(x2d).sharding, "spec", None)
    explicit = spec is not None and len(spec) > 0 and spec[0] is not None
    k = 1 if explicit else next(k for k in (64, 32, 16, 8, 4, 2, 1) if rows % k == 0)
    ones = jnp.ones((rows // k,), x2d.dtype)
    partial = jax.lax.dot_general(
        ones, x2d.reshape(rows // k, k, c), (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST
    )
    return partial.sum(axis=0)


def _reduce_sum(x2d: jax.Array) -> jax.Array:
    return jnp.sum(x2d, axis=0)


def channel_sum(x2d: jax.Array) -> jax.Array:
    """``[R, C] -> [C]``: the sum over rows; a ``ones @ x`` product on the CPU."""
    return jax.lax.platform_dependent(x2d, cpu=_dot_sum, default=_reduce_sum)


def _total(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None = None):
    """Training-mode batch normalisation over every axis but the last.

    ``x [..., C]``, ``scale [C]``, ``bias [C]`` -> ``(y [..., C], mean [C], var [C])`` with
    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``; ``mean`` and the biased ``var``
    are the batch's (two-pass). Differentiable in all three outputs. Under ``pmap``, with
    ``axis_name``, the statistics are over the global batch (every device's rows, ``psum``-ed)
    and the backward pass sums its two channel reductions the same way.
    """
    return _forward(x, scale, bias, epsilon, axis_name)[0]


def _forward(x, scale, bias, epsilon, axis_name):
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    rows = _total(jnp.asarray(x2.shape[0], x.dtype), axis_name)
    mean = _total(channel_sum(x2), axis_name) / rows
    centred = x2 - mean
    var = _total(channel_sum(centred * centred), axis_name) / rows
    inv = jax.lax.rsqrt(var + epsilon)
    y = centred * (inv * scale) + bias
    return (y.reshape(x.shape), mean, var), (x, mean, inv, scale, rows)


def _backward(epsilon, axis_name, residuals, cotangents):
    del epsilon
    x, mean, inv, scale, rows = residuals
    g_y, g_mean, g_var = cotangents
    c = x.shape[-1]
    x2, g2 = x.reshape(-1, c), g_y.reshape(-1, c)
    x_hat = (x2 - mean) * inv
    d_bias = channel_sum(g2)
    d_scale = channel_sum(g2 * x_hat)
    # dL/dx through y (the standard BatchNorm backward), plus the direct uses of mean and var.
    # Under pmap every device's rows moved the statistics: their sums are global.
    total_bias, total_scale = _total(d_bias, axis_name), _total(d_scale, axis_name)
    g_mean, g_var = _total(g_mean, axis_name), _total(g_var, axis_name)
    dx = (inv * scale) * (g2 - (total_bias + x_hat * total_scale) / rows)
    dx = dx + g_mean / rows + (2.0 / rows) * g_var * (x2 - mean)
    return dx.reshape(x.shape), d_scale, d_bias


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` with :func:`batch_norm_train` as its training path (see the module
    docstring); same constructor, variables and evaluation path."""

    def _fast(self, x: jax.Array, mask) -> bool:
        return (
            mask is None
            and self.axis_index_groups is None
            and self.axis in (-1, x.ndim - 1)
            and self.dtype in (None, jnp.float32)
            and x.dtype == jnp.float32
            and self.scale is not None
            and self.bias is not None
            and self.scale[...].dtype == jnp.float32
        )

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = self.use_running_average if use_running_average is None else use_running_average
        if running is None or running or not self._fast(x, mask):
            return super().__call__(x, use_running_average, mask=mask)
        y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon, self.axis_name)
        m = self.momentum
        self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
        self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var)
        return y
