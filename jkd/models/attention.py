"""Attention kernels for whole sequences (training, scoring): the decoder's no-cache path.

A kernel is a small frozen object, ``kernel(q, k, v, mask) -> out`` with ``q [B, T, H, hd]``,
``k, v [B, Hkv, S, hd]`` (head-major, the KV cache's layout), ``mask [B, T, S]`` (True where a
query sees a key: causal, padding and packed segments already combined) and ``out [B, T, H, hd]``.
It is a static attribute of the :class:`~jkd.models.decoder.Decoder` (part of its graph
definition), set with :func:`~jkd.models.decoder.set_attention`; decoding with a KV cache keeps
the plain attention.

- :class:`BlockedAttention` (the default, and the CPU path): jkd's XLA attention, the causal
  blocks above the diagonal skipped.
- :class:`FusedAttention`: ``jax.nn.dot_product_attention`` with a named implementation: ``"cudnn"``
  (cuDNN's flash attention on NVIDIA GPUs, float16/bfloat16 only) or ``"xla"`` (JAX's own; the same
  call on any backend, which is how the CPU tests check the wrapper: grouped-query heads, masks).

:func:`for_backend` picks one for a backend and a compute dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockedAttention:
    """jkd's attention in XLA: scores and softmax in float32, causal blocks of ``CAUSAL_BLOCK``
    query rows skipping the keys above the diagonal (:func:`~jkd.models.decoder.attend_causal`)."""

    description = "jkd's blocked XLA attention"

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        from jkd.models.decoder import attend, attend_causal, causal_block

        block = causal_block(q.shape[1])
        return attend(q, k, v, mask) if block is None else attend_causal(q, k, v, mask, block=block)


@dataclasses.dataclass(frozen=True)
class FusedAttention:
    """``jax.nn.dot_product_attention(..., implementation=implementation)``: grouped-query heads as
    the function takes them (no repeated keys), the boolean mask per row."""

    implementation: str = "cudnn"

    @property
    def description(self) -> str:
        return {"cudnn": "cuDNN flash attention"}.get(self.implementation, "JAX's fused XLA attention") + \
            f" (jax.nn.dot_product_attention, implementation={self.implementation!r})"

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, Hkv, hd]
        # JAX's own XLA path mixes its boolean mask with float scores: under a user's strict dtype
        # promotion it would fail inside JAX; every input here has one dtype already
        with jax.numpy_dtype_promotion("standard"):
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None],
                                               implementation=self.implementation)
        return out.astype(v.dtype)


def for_backend(backend: str, compute_dtype) -> BlockedAttention | FusedAttention:
    """The kernel for ``backend`` (``jax.default_backend()``) and the passes' dtype: cuDNN's flash
    attention on a GPU in float16/bfloat16 (it takes no float32), else the blocked XLA attention."""
    if backend in ("gpu", "cuda") and jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return FusedAttention("cudnn")
    return BlockedAttention()
