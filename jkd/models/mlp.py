"""Multi-layer perceptrons: Hinton's 2x1200 teacher and small students."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jkd.models._layers import expose
from jkd.models.dropout import Dropout


class MLP(nnx.Module):
    """``[B, H, W, C] -> [B, num_classes]``: flatten, ``hidden`` ReLU layers, linear head.

    Features: ``hidden1``, ``hidden2``, ... (post-ReLU) and ``pooled`` (what the head reads).
    ``dropout`` applies after each hidden layer in train mode (Hinton et al. trained the 2x1200 teacher with dropout).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        *,
        dropout: float = 0.0,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        sizes = (in_features, *hidden)
        self.layers = nnx.List([nnx.Linear(m, n, rngs=rngs) for m, n in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
        # axis_name: the pmap axis, so that masks do not depend on the device count.
        self.dropout = Dropout(dropout, axis_name=axis_name, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, layer in enumerate(self.layers):
            x = expose(self, f"hidden{i + 1}", jax.nn.relu(layer(x)))
            if self.dropout is not None:
                x = self.dropout(x)
        return self.head(expose(self, "pooled", x))
