"""A small CNN: two conv blocks and a dense head (a cheap student or MNIST teacher)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jkd.models._layers import batch_norm, conv, expose


class SmallCNN(nnx.Module):
    """``[B, H, W, C] -> [B, num_classes]``: (conv3x3-BN-ReLU-maxpool) x 2, global mean, dense.

    Features: ``block1``, ``block2`` (NHWC maps, for attention transfer), ``pooled``.
    ``channels=(c1, c2)`` sets the two convolutions' widths apart (default ``(width, 2 width)``):
    what structured pruning leaves (:mod:`jkd.compress.structured`).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width: int = 32,
        channels: tuple[int, int] | None = None,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        c1, c2 = channels if channels is not None else (width, 2 * width)
        self.conv1 = conv(in_channels, c1, 3, rngs=rngs)
        self.bn1 = batch_norm(c1, axis_name=bn_axis_name, rngs=rngs)
        self.conv2 = conv(c1, c2, 3, rngs=rngs)
        self.bn2 = batch_norm(c2, axis_name=bn_axis_name, rngs=rngs)
        self.head = nnx.Linear(c2, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = expose(self, "block1", nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        x = expose(self, "block2", nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2)))
        return self.head(expose(self, "pooled", jnp.mean(x, axis=(1, 2))))
