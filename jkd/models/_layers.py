"""Small shared pieces of the model zoo: initialisers, conv+BN, feature exposure."""

from __future__ import annotations

import jax
from flax import nnx

from jkd.models.batchnorm import BatchNorm

# He et al. (2015) normal init on fan-out, as the CIFAR ResNet/WRN reference code uses.
he_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

BN_MOMENTUM = 0.9  # = PyTorch's momentum 0.1 (flax keeps `momentum` of the old statistics)


def conv(cin: int, cout: int, kernel: int, stride: int = 1, *, groups: int = 1, rngs: nnx.Rngs) -> nnx.Conv:
    """A bias-free ``kernel x kernel`` conv with SAME-style padding (``kernel // 2``)."""
    pad = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=he_fan_out,
        rngs=rngs,
    )


def batch_norm(features: int, *, axis_name: str | None, rngs: nnx.Rngs) -> BatchNorm:
    """BatchNorm with PyTorch-equivalent momentum; ``axis_name`` averages statistics across
    devices under ``pmap`` (under ``jit`` on a mesh the statistics are global anyway). jkd's
    :class:`~jkd.models.batchnorm.BatchNorm`: flax's, with CPU-fast training reductions."""
    return BatchNorm(features, momentum=BN_MOMENTUM, epsilon=1e-5, axis_name=axis_name, rngs=rngs)


FEATURE_PREFIX = "feature_"  # keeps sown names apart from the module's own attributes


def expose(module: nnx.Module, name: str, value: jax.Array) -> jax.Array:
    """Record an intermediate feature when the call runs under ``jkd.models.call_with_features``
    (``nnx.capture``); a plain call records nothing and costs nothing. Returns ``value``."""
    if hasattr(module, "__captures__"):  # set by nnx.capture on the modules it traces
        module.sow(nnx.Intermediate, FEATURE_PREFIX + name, value)
    return value


_capture = nnx.capture(lambda model, x: model(x), nnx.Intermediate)


def call_with_features(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``model(x)`` plus the features it exposes (``stage1``, ``pooled``, ...), by name.

    The model's code and a plain ``model(x)`` call are unchanged: features are recorded only
    under this call (``nnx.capture``). Works inside ``jit`` on a model merged there.
    """
    logits, captured = _capture(model, x)
    features = {}
    for path, variable in nnx.to_flat_state(captured):
        value = variable.get_value()
        features[str(path[-1]).removeprefix(FEATURE_PREFIX)] = value[-1] if isinstance(value, tuple) else value
    return logits, features
