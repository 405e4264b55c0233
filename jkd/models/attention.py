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
- :class:`SplashAttention`: the Pallas splash attention kernel of TPUs (causal, packed segments;
  ``interpret=True`` runs it on any backend, which is how the CPU tests check it).

:func:`for_backend` picks one for a backend and a compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math

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
        return {"cudnn": "cuDNN flash attention"}.get(
            self.implementation, "JAX's fused XLA attention"
        ) + f" (jax.nn.dot_product_attention, implementation={self.implementation!r})"

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, Hkv, hd]
        # JAX's own XLA path mixes its boolean mask with float scores: under a user's strict dtype
        # promotion it would fail inside JAX; every input here has one dtype already. (Its bfloat16
        # gradient still fails to lower under strict promotion, inside JAX: use the default there.)
        with jax.numpy_dtype_promotion("standard"):
            out = jax.nn.dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None], implementation=self.implementation
            )
        return out.astype(v.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, heads: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


@dataclasses.dataclass(frozen=True)
class SplashAttention:
    """The Pallas splash attention kernel (TPUs): causal, with each query's segment taken from the
    mask (the first key it sees: the start of its packed sequence; left padding a segment of its
    own), grouped-query heads repeated to the query heads. Sequences whose length is not a multiple
    of 128 (the kernel's block unit) take the blocked XLA attention. ``interpret``: run the kernel's
    Python semantics on any backend (tests)."""

    interpret: bool = False
    block: int = 512

    description = "Pallas splash attention (TPU)"

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

        b, t, h, hd = q.shape
        if t % 128 or k.shape[2] != t:
            return BlockedAttention()(q, k, v, mask)
        kernel = _splash_kernel(t, h, math.gcd(self.block, t), self.interpret)
        g = h // k.shape[1]
        segments = jnp.argmax(mask, axis=-1).astype(jnp.int32)  # [B, T]: where each query's sequence starts
        qh = (q * (1.0 / math.sqrt(hd))).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, H, T, hd]
        kh, vh = (jnp.repeat(x, g, axis=1).astype(q.dtype) for x in (k, v))
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(q=s1, kv=s1)))(
            qh, kh, vh, segments
        )
        return out.transpose(0, 2, 1, 3).astype(v.dtype)


def for_backend(backend: str, compute_dtype, devices: int = 1):
    """The kernel for ``backend`` (``jax.default_backend()``), the passes' dtype and the devices the
    step runs on: cuDNN's flash attention on a GPU in float16/bfloat16 (it takes no float32); the
    splash kernel on one TPU (over a mesh it is not yet placed per device: the blocked path); else
    the blocked XLA attention."""
    if backend in ("gpu", "cuda") and jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return FusedAttention("cudnn")
    if backend == "tpu" and devices == 1:
        return SplashAttention()
    return BlockedAttention()
