"""llama.cpp's block quantizations in JAX, value for value: what a language-model student's weights
become in a GGUF file, for training it as it will run (quantization-aware distillation) and for
measuring it as it will run (post-training quantization).

``q8_0``: each block of 32 consecutive weights of a row is stored as 32 int8 values and one float16
scale ``d = max|x| / 127``; a weight reads back as ``round(x / d) * d`` (rounded half away from zero,
with the scale in float16). ``q4_0``: 32 4-bit values and one float16 scale ``d = m / -8``, ``m`` the
block's weight of largest magnitude (its sign kept); a weight reads back as
``(clip(trunc(x / d + 8.5), 0, 15) - 8) * d``. These are llama.cpp's reference quantizers (the
``gguf`` package's numpy ones, which the tests compare against, bit for bit).

Which tensor gets which type is :func:`tensor_type` (the one rule :mod:`jkd.models.gguf_io` writes
by): norms and biases stay float32, matrices whose rows are not whole blocks float16, and under
``q4_0`` the embedding and the output head ``q8_0``.

:func:`fake_quantize` gives the weights as the file holds them, with straight-through gradients
(the gradient of the float weights is the gradient of the read-back ones, as QAT trains): the
student trains in float32 and its forward pass sees what llama.cpp will compute with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

QUANTS = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32
_HIGH_PRECISION = ("token_embd.weight", "output.weight")  # kept at q8_0 under q4_0, as llama.cpp's quantizer


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> str:
    """The GGML type (``F32``, ``F16``, ``Q8_0``, ``Q4_0``) of tensor ``gguf_name`` of ``shape``
    in a file quantized at ``quant``."""
    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if len(shape) == 1 or quant == "f32":
        return "F32"
    if quant == "f16" or shape[-1] % BLOCK:
        return "F16"
    if quant == "q4_0" and gguf_name not in _HIGH_PRECISION:
        return "Q4_0"
    return "Q8_0"


def _blocks(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def _f16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float16).astype(jnp.float32)


def q8_0(x: jax.Array) -> jax.Array:
    """``x [..., K]`` (``K`` a multiple of 32) as a q8_0 file reads it back, float32."""
    b = _blocks(x.astype(jnp.float32))
    d = jnp.max(jnp.abs(b), axis=-1, keepdims=True) / 127
    inv = jnp.where(d == 0, 0.0, 1 / jnp.where(d == 0, 1.0, d))
    y = b * inv
    q = jnp.sign(y) * jnp.floor(jnp.abs(y) + 0.5)  # half away from zero
    return (q * _f16(d)).reshape(x.shape)


def q4_0(x: jax.Array) -> jax.Array:
    """``x [..., K]`` (``K`` a multiple of 32) as a q4_0 file reads it back, float32."""
    b = _blocks(x.astype(jnp.float32))
    m = jnp.take_along_axis(b, jnp.argmax(jnp.abs(b), axis=-1, keepdims=True), axis=-1)
    d = m / -8
    inv = jnp.where(d == 0, 0.0, 1 / jnp.where(d == 0, 1.0, d))
    q = jnp.clip(jnp.trunc(b * inv + 8.5), 0, 15)
    return ((q - 8) * _f16(d)).reshape(x.shape)


_READ_BACK = {"F32": lambda x: x.astype(jnp.float32), "F16": _f16, "Q8_0": q8_0, "Q4_0": q4_0}


def read_back(x: jax.Array, ggml_type: str) -> jax.Array:
    """``x`` as a tensor of ``ggml_type`` holds it."""
    return _READ_BACK[ggml_type](x)


def _straight_through(x: jax.Array, ggml_type: str) -> jax.Array:
    return x + jax.lax.stop_gradient(read_back(x, ggml_type).astype(x.dtype) - x)


def fake_quantize(params: nnx.State, quant: str | None) -> nnx.State:
    """A decoder's parameters as a GGUF file at ``quant`` holds them (None: unchanged), each with a
    straight-through gradient. ``params``: ``nnx.state(decoder, nnx.Param)`` or its pure form."""
    if quant is None:
        return params
    from jkd.models.decoder_sharding import hf_name
    from jkd.models.gguf_io import gguf_name

    flat = []
    for path, v in nnx.to_flat_state(params):
        var = isinstance(v, nnx.Variable)
        x = v[...] if var else v
        kind = tensor_type(gguf_name(hf_name(path)), tuple(x.shape), quant)
        y = x if kind == "F32" else _straight_through(x, kind)
        flat.append((path, v.replace(y) if var else y))
    return nnx.from_flat_state(flat)
