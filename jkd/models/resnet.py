"""CIFAR ResNets (He et al. 2016) and wide ResNets (Zagoruyko & Komodakis 2016).

The CIFAR ResNets follow the distillation benchmarks' code (CRD, Tian et al. 2020; DKD):
depth ``6n + 2``, basic blocks, a 1x1 conv + BN shortcut where the shape changes; the ``x4``
variants widen every stage four-fold. The WRNs use pre-activation blocks.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jkd.models.dropout import Dropout

from jkd.models._layers import batch_norm, conv, expose


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, bn_axis_name, rngs: nnx.Rngs):
        self.conv1 = conv(cin, cout, 3, stride, rngs=rngs)
        self.bn1 = batch_norm(cout, axis_name=bn_axis_name, rngs=rngs)
        self.conv2 = conv(cout, cout, 3, rngs=rngs)
        self.bn2 = batch_norm(cout, axis_name=bn_axis_name, rngs=rngs)
        if stride != 1 or cin != cout:
            self.short_conv = conv(cin, cout, 1, stride, rngs=rngs)
            self.short_bn = batch_norm(cout, axis_name=bn_axis_name, rngs=rngs)
        else:
            self.short_conv = self.short_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        short = x if self.short_conv is None else self.short_bn(self.short_conv(x))
        return jax.nn.relu(y + short)


class CifarResNet(nnx.Module):
    """``[B, 32, 32, C] -> [B, num_classes]``. Features: ``stem``, ``stage1..3``, ``pooled``.

    Args:
      depth: ``6n + 2`` (8, 14, 20, 32, 44, 56, 110).
      widths: stem width then the three stage widths: ``(16, 16, 32, 64)`` for resnetN,
        ``(32, 64, 128, 256)`` for resnetNx4.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        widths: Sequence[int] = (16, 16, 32, 64),
        in_channels: int = 3,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (8, 14, 20, ...); got {depth}.")
        n = (depth - 2) // 6
        self.stem = conv(in_channels, widths[0], 3, rngs=rngs)
        self.stem_bn = batch_norm(widths[0], axis_name=bn_axis_name, rngs=rngs)
        stages, cin = [], widths[0]
        for s, cout in enumerate(widths[1:]):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, bn_axis_name=bn_axis_name, rngs=rngs))
                cin = cout
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = expose(self, "stem", jax.nn.relu(self.stem_bn(self.stem(x))))
        for s, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            expose(self, f"stage{s + 1}", x)
        return self.head(expose(self, "pooled", jnp.mean(x, axis=(1, 2))))


class WideBlock(nnx.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, 1x1 conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, *, dropout: float, bn_axis_name, rngs: nnx.Rngs):
        self.bn1 = batch_norm(cin, axis_name=bn_axis_name, rngs=rngs)
        self.conv1 = conv(cin, cout, 3, stride, rngs=rngs)
        self.bn2 = batch_norm(cout, axis_name=bn_axis_name, rngs=rngs)
        self.conv2 = conv(cout, cout, 3, rngs=rngs)
        self.dropout = Dropout(dropout, axis_name=bn_axis_name, rngs=rngs) if dropout > 0 else None
        self.short_conv = conv(cin, cout, 1, stride, rngs=rngs) if (stride != 1 or cin != cout) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        o = jax.nn.relu(self.bn1(x))
        y = self.conv1(o)
        y = jax.nn.relu(self.bn2(y))
        if self.dropout is not None:
            y = self.dropout(y)
        y = self.conv2(y)
        short = x if self.short_conv is None else self.short_conv(o)
        return y + short


class WideResNet(nnx.Module):
    """WRN-depth-k: ``[B, 32, 32, C] -> [B, num_classes]``. Features: ``stage1..3``, ``pooled``."""

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        *,
        in_channels: int = 3,
        dropout: float = 0.0,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, 40, ...); got {depth}.")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = conv(in_channels, widths[0], 3, rngs=rngs)
        stages, cin = [], widths[0]
        for s, cout in enumerate(widths[1:]):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(WideBlock(cin, cout, stride, dropout=dropout, bn_axis_name=bn_axis_name, rngs=rngs))
                cin = cout
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.bn = batch_norm(cin, axis_name=bn_axis_name, rngs=rngs)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            expose(self, f"stage{s + 1}", x)
        x = jax.nn.relu(self.bn(x))
        return self.head(expose(self, "pooled", jnp.mean(x, axis=(1, 2))))
