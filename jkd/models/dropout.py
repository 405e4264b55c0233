"""Dropout whose masks do not depend on how the batch is split over devices.

``flax.nnx.Dropout`` draws a mask of the input's shape. Under ``pmap`` every device holds the
same key (the state is replicated) and draws a mask of its *local* shape, so device ``d``'s rows
get other masks than the same rows on one device. :class:`Dropout` with the ``pmap`` axis name
draws the mask of the *global* batch with that shared key and keeps its own rows: one device,
a mesh (which sees the global batch) and ``pmap`` over any device count drop the same units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Dropout(nnx.Dropout):
    """``flax.nnx.Dropout`` plus ``axis_name`` (the ``pmap`` axis, or None: flax's own path)."""

    def __init__(self, rate: float, *, axis_name: str | None = None, **kwargs):
        super().__init__(rate, **kwargs)
        self.axis_name = axis_name

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        off = self.deterministic if deterministic is None else deterministic
        if self.axis_name is None or rngs is not None or off or self.rate in (0.0, 1.0) or self.broadcast_dims:
            # Only the arguments given: exporters (jax2onnx) patch flax's __call__ with fewer.
            given = {k: v for k, v in (("deterministic", deterministic), ("rngs", rngs)) if v is not None}
            return super().__call__(inputs, **given)
        local = inputs.shape[0]
        devices = jax.lax.axis_size(self.axis_name)
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.rngs(), p=keep, shape=(devices * local, *inputs.shape[1:]))
        mine = jax.lax.dynamic_slice_in_dim(mask, jax.lax.axis_index(self.axis_name) * local, local, axis=0)
        return jax.lax.select(mine, inputs / keep, jnp.zeros_like(inputs))
