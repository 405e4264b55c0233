"""int8 quantization of a trained student with qwix: post-training (PTQ) and
quantization-aware training (QAT, where the teacher teaches the quantized student).

Three schemes, named by what is stored and computed in int8:

- :data:`INT8_WEIGHTS`: int8 weights with per-output-channel scales; dense layers take float
  activations. XLA's convolutions need both operands in one type, so convolutions also
  quantize their input activations, dynamically (per example, at run time).
- :data:`INT8_STATIC`: int8 weights and int8 activations with *static* scales calibrated on
  training images (the mean per-image absolute maximum of each layer input), as served by
  integer-only runtimes.
- QAT: :func:`qat_model` wraps the float model in fake quantization (straight-through
  gradients) for training; :func:`quantize` of the trained weights gives the int8 model.

Quantized models are ordinary NNX models (the int8 values and scales are their ``Param``
state): :func:`jkd.train.freeze_model`, :func:`jkd.train.apply_model`, ``eval_step`` and
:mod:`jkd.export` take them unchanged.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

import qwix


@dataclasses.dataclass(frozen=True)
class Int8Scheme:
    """What is quantized: ``activations`` (convolution inputs are always quantized) and
    whether activation scales are ``static`` (calibrated once) or dynamic (per call)."""

    name: str
    activations: bool
    static: bool


INT8_WEIGHTS = Int8Scheme("int8 weights", activations=False, static=False)
INT8_STATIC = Int8Scheme("int8 weights+activations (static)", activations=True, static=True)
INT8_DYNAMIC = Int8Scheme("int8 weights+activations (dynamic)", activations=True, static=False)
SCHEMES = {s.name: s for s in (INT8_WEIGHTS, INT8_STATIC, INT8_DYNAMIC)}


# qwix 0.1.8 calls flax APIs that flax 0.12.8 deprecates (``Module.iter_modules``,
# ``Variable.value``); those warnings are qwix's to fix, not a user's, so they are hidden.
# Only DeprecationWarnings raised from qwix's own modules are affected.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"qwix(\.|$)")


def qwix_promotion():
    """A context with JAX's standard dtype promotion, for tracing or running int8 models:
    qwix's ops mix int32 and float32, which ``jax_numpy_dtype_promotion="strict"`` rejects
    (jkd's own tests run strict). Without strict promotion set, it changes nothing."""
    return jax.numpy_dtype_promotion("standard")


def _rules(scheme: Int8Scheme, rule_cls):
    int8 = jnp.int8
    conv = rule_cls(
        module_path=".*",
        op_names=("conv_general_dilated",),
        weight_qtype=int8,
        act_qtype=int8,
        act_static_scale=scheme.static,
    )
    if scheme.activations:
        dense = rule_cls(
            module_path=".*",
            op_names=("dot_general", "einsum"),
            weight_qtype=int8,
            act_qtype=int8,
            act_static_scale=scheme.static,
        )
    else:
        dense = rule_cls(module_path=".*", op_names=("dot_general", "einsum"), weight_qtype=int8)
    return [conv, dense]


def _check_images(images, what: str):
    if not hasattr(images, "ndim") or images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"{what} must be normalised float images [N, H, W, C]; got "
            f"{getattr(images, 'dtype', type(images))} of shape {getattr(images, 'shape', None)}."
        )


def quantize(model: nnx.Module, calibration: jax.Array, scheme: Int8Scheme = INT8_WEIGHTS) -> nnx.Module:
    """An int8 copy of ``model`` (the original is untouched), in eval mode.

    ``calibration``: normalised training images ``[N, H, W, C]`` (the model's input view).
    With a static scheme the activation scales are their mean per-image absolute maximum,
    so pass a few hundred to a few thousand images; otherwise a handful suffice (only shapes
    matter). Weights get per-output-channel absmax scales.
    """
    _check_images(calibration, "calibration")
    if not isinstance(scheme, Int8Scheme):
        raise TypeError(f"scheme must be an Int8Scheme ({', '.join(SCHEMES)}); got {scheme!r}.")
    model = nnx.clone(model)
    model.eval()
    with qwix_promotion():
        q = qwix.quantize_model(model, qwix.PtqProvider(_rules(scheme, qwix.QuantizationRule)), calibration)
    q.eval()
    return q


def qat_model(model: nnx.Module, sample: jax.Array, scheme: Int8Scheme = INT8_WEIGHTS) -> nnx.Module:
    """``model`` under fake int8 quantization for quantization-aware training.

    Its parameters stay float (and keep their structure), so it trains with the usual train
    steps and optimizers; gradients pass the rounding straight through. Only dynamic schemes
    are supported for QAT (static scales are calibrated after training, by :func:`quantize`).
    """
    _check_images(sample, "sample")
    if scheme.static:
        raise ValueError(
            "QAT trains with dynamic activation scales; quantize the trained model with "
            "INT8_STATIC afterwards to get static ones."
        )
    model = nnx.clone(model)
    with qwix_promotion():
        return qwix.quantize_model(model, qwix.QtProvider(_rules(scheme, qwix.QtRule)), sample)


def int8_fraction(params) -> float:
    """Fraction of parameter values stored as int8 (the rest: scales, biases, BatchNorm)."""
    leaves = jax.tree.leaves(params)
    total = sum(x.size for x in leaves)
    return sum(x.size for x in leaves if x.dtype == jnp.int8) / max(total, 1)
