"""Models by name (for configs and the CLI), feature read-out, and size/cost reporting."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jkd.models.cnn import SmallCNN
from jkd.models.mlp import MLP
from jkd.models.mobilenet import MobileNetV2
from jkd.models.resnet import CifarResNet, WideResNet

Factory = Callable[..., nnx.Module]


def _resnet(depth: int, widths=(16, 16, 32, 64)) -> Factory:
    return lambda num_classes, input_shape, rngs, bn_axis_name=None: CifarResNet(
        depth, num_classes, widths=widths, in_channels=input_shape[-1], bn_axis_name=bn_axis_name, rngs=rngs
    )


def _wrn(depth: int, widen: int) -> Factory:
    return lambda num_classes, input_shape, rngs, bn_axis_name=None, dropout=0.0: WideResNet(
        depth, widen, num_classes, in_channels=input_shape[-1], dropout=dropout, bn_axis_name=bn_axis_name, rngs=rngs
    )


def _mlp(hidden: tuple[int, ...], dropout: float = 0.0) -> Factory:
    def make(num_classes, input_shape, rngs, bn_axis_name=None, hidden=hidden, dropout=dropout):
        return MLP(
            math.prod(input_shape), tuple(hidden), num_classes, dropout=dropout, axis_name=bn_axis_name, rngs=rngs
        )

    return make


MODELS: dict[str, Factory] = {
    # Hinton et al. 2015 MNIST pair and small students.
    "mlp_2x1200": _mlp((1200, 1200), dropout=0.2),
    "mlp_2x800": _mlp((800, 800)),
    "mlp_100": _mlp((100,)),
    "mlp_30": _mlp((30,)),
    "mlp": _mlp((256,)),  # options: hidden=(...), dropout=...
    "cnn": lambda num_classes, input_shape, rngs, bn_axis_name=None, width=32, channels=None: SmallCNN(
        input_shape[-1], num_classes, width=width, channels=channels, bn_axis_name=bn_axis_name, rngs=rngs
    ),
    **{f"resnet{d}": _resnet(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet(8, (32, 64, 128, 256)),
    "resnet32x4": _resnet(32, (32, 64, 128, 256)),
    **{f"wrn_{d}_{k}": _wrn(d, k) for d in (16, 40) for k in (1, 2)},
    "mobilenetv2": lambda num_classes, input_shape, rngs, bn_axis_name=None, width=0.5: MobileNetV2(
        num_classes, width=width, in_channels=input_shape[-1], bn_axis_name=bn_axis_name, rngs=rngs
    ),
}


_NOT_OPTIONS = {"num_classes", "input_shape", "rngs", "bn_axis_name"}


def _option_problem(key: str, value) -> str | None:
    if key == "hidden":
        ok = (
            isinstance(value, (tuple, list))
            and value
            and all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in value)
        )
        return None if ok else "a tuple of positive integers, e.g. hidden=(256,) or hidden=(512,256)"
    if key == "dropout":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
        return None if ok else "a number in [0, 1), e.g. dropout=0.2"
    if key == "channels":
        ok = (
            isinstance(value, (tuple, list))
            and len(value) == 2
            and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in value)
        )
        return None if ok else "two positive integers, e.g. channels=(16, 32)"
    if key == "width":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        return None if ok else "a positive number, e.g. width=0.5 or width=32"
    return None


def check_model(name: str, options: dict) -> None:
    """Refuse an unknown model name or a size option it does not take (or of the wrong type),
    naming what it takes; runs before anything is built or trained."""
    import inspect

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}.")
    accepted = [p for p in inspect.signature(MODELS[name]).parameters if p not in _NOT_OPTIONS]
    for key, value in options.items():
        if key not in accepted:
            raise ValueError(f"model {name!r} takes no option {key!r}; its options: {', '.join(accepted) or '(none)'}.")
        problem = _option_problem(key, value)
        if problem:
            raise ValueError(f"model option {key}={value!r} for {name!r}: expected {problem}.")


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    seed: int = 0,
    bn_axis_name: str | None = None,
    **options,
) -> nnx.Module:
    """Build a model of the zoo by name, e.g. ``create_model("resnet8x4", num_classes=100,
    input_shape=(32, 32, 3))``. ``options`` are the family's size options (``hidden``,
    ``dropout``, ``width``). ``bn_axis_name`` is needed under ``pmap`` only."""
    check_model(name, options)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}.")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C); got {input_shape}.")
    try:
        return MODELS[name](num_classes, tuple(input_shape), nnx.Rngs(seed), bn_axis_name=bn_axis_name, **options)
    except TypeError as e:
        raise ValueError(f"bad size options {options} for model {name!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """Trainable parameters, and FLOPs of one forward pass on one example.

    FLOPs count the convolutions and matrix products, a multiply-add as 2 (the convention
    of the model-compression literature, where "MACs" are half of this); normalisation,
    activations and pooling are not counted.
    """

    params: int
    flops: int


def _matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every ``dot_general`` and ``conv_general_dilated`` in a jaxpr."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in lhs_contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
            cin_per_group = rhs[dn.rhs_spec[1]]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * spatial * cin_per_group
        for sub in _subjaxprs(eqn):  # pjit, custom_jvp, ... bodies
            total += _matmul_flops(sub)
    return total


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def model_stats(model: nnx.Module, input_shape: tuple[int, ...]) -> ModelStats:
    """Parameter count and per-example FLOPs of ``model`` (eval mode), without running it."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))

    def forward(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        m.eval()
        return m(x)

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    closed = jax.make_jaxpr(forward)(params, rest, x)
    return ModelStats(params=n_params, flops=_matmul_flops(closed.jaxpr))
