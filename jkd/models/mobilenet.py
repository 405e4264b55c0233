"""MobileNetV2 for 32x32 inputs (Sandler et al. 2018), the mobile student of the CIFAR
distillation benchmarks: the stem and the second stage keep stride 1 on small images."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jkd.models._layers import batch_norm, conv, expose

# (expansion t, channels c, repeats n, stride s) from the paper's Table 2, CIFAR strides.
CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _round(c: float, divisor: int = 8) -> int:
    return max(divisor, int(c + divisor / 2) // divisor * divisor)


class InvertedResidual(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, *, bn_axis_name, rngs: nnx.Rngs):
        hidden = cin * expand
        self.expand = conv(cin, hidden, 1, rngs=rngs) if expand != 1 else None
        self.bn0 = batch_norm(hidden, axis_name=bn_axis_name, rngs=rngs) if expand != 1 else None
        self.depthwise = conv(hidden, hidden, 3, stride, groups=hidden, rngs=rngs)
        self.bn1 = batch_norm(hidden, axis_name=bn_axis_name, rngs=rngs)
        self.project = conv(hidden, cout, 1, rngs=rngs)
        self.bn2 = batch_norm(cout, axis_name=bn_axis_name, rngs=rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x if self.expand is None else jax.nn.relu6(self.bn0(self.expand(x)))
        y = jax.nn.relu6(self.bn1(self.depthwise(y)))
        y = self.bn2(self.project(y))
        return x + y if self.residual else y


class MobileNetV2(nnx.Module):
    """``[B, 32, 32, C] -> [B, num_classes]``; ``width`` scales every layer (0.5 in CRD).

    Features: ``stage1..7`` (after each inverted-residual group), ``pooled``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        width: float = 1.0,
        in_channels: int = 3,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        cin = _round(32 * width)
        self.stem = conv(in_channels, cin, 3, rngs=rngs)
        self.stem_bn = batch_norm(cin, axis_name=bn_axis_name, rngs=rngs)
        groups = []
        for t, c, n, s in CIFAR_SETTINGS:
            cout = _round(c * width)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, bn_axis_name=bn_axis_name, rngs=rngs))
                cin = cout
            groups.append(nnx.List(blocks))
        self.groups = nnx.List(groups)
        last = _round(1280 * max(1.0, width))
        self.last = conv(cin, last, 1, rngs=rngs)
        self.last_bn = batch_norm(last, axis_name=bn_axis_name, rngs=rngs)
        self.head = nnx.Linear(last, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu6(self.stem_bn(self.stem(x)))
        for g, group in enumerate(self.groups):
            for block in group:
                x = block(x)
            expose(self, f"stage{g + 1}", x)
        x = jax.nn.relu6(self.last_bn(self.last(x)))
        return self.head(expose(self, "pooled", jnp.mean(x, axis=(1, 2))))
