"""A decoder-only transformer of the Llama / Qwen2 / Qwen3 family, in Flax NNX.

RMSNorm, rotary embeddings (with Llama 3's frequency scaling), grouped-query attention, a SwiGLU
MLP, tied or separate embeddings, q/k/v biases (Qwen2) and q/k RMSNorm (Qwen3). Parameters keep
Hugging Face's names and layouts (``layers[i].self_attn.q_proj.weight`` is ``[out, in]``), so a
checkpoint maps onto the module tensor for tensor with no transposes (:mod:`jkd.models.hf`).

Attention takes a padding mask, per-token positions and segment ids (packed sequences), so
batches of different lengths, left or right padded, and packed rows are all exact. ``decode``
runs the same layers against a :class:`KVCache` for the sampler (:mod:`jkd.models.sampler`).

Shapes: ``B`` batch, ``T`` new tokens, ``S`` cache slots, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jkd.models._layers import expose
from jkd.models.attention import BlockedAttention
from jkd.models.decoder_config import DecoderConfig

_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite: a row with no visible key stays finite


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


@jax.custom_vjp
def linear(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``x [..., in]`` times ``weight [out, in]`` transposed -> ``[..., out]``.

    The same value and gradients as ``jnp.einsum("...i,oi->...o", x, weight)``; only the weight
    gradient's product is arranged differently: ``(x^T dy)^T`` over the flattened tokens, so the
    transposed copy the CPU's matrix product needs is of ``x`` (shared by the projections that
    read it) rather than of ``dy`` with the backward's element-wise work fused into a transposed
    walk. The student's forward + backward on the CPU: 389 -> 340 ms and 442 -> 395 ms
    (``benchmarks/lm_kd_step.py``). Differentiable in reverse mode only.
    """
    return jnp.einsum("...i,oi->...o", x, weight)


def _linear_fwd(x, weight):
    return linear(x, weight), (x, weight)


def _linear_bwd(res, dy):
    x, weight = res
    dx = jnp.einsum("...o,oi->...i", dy, weight)
    dw = jnp.einsum("ni,no->io", x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])).T
    return dx, dw


linear.defvjp(_linear_fwd, _linear_bwd)


class Linear(nnx.Module):
    """``[..., in] -> [..., out]`` with a ``weight`` of shape ``[out, in]`` (PyTorch's layout)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = linear(x, self.weight[...])
        return y if self.bias is None else y + self.bias[...]


class Embedding(nnx.Module):
    """Token ids ``[...]`` -> ``[..., D]``; ``weight`` is ``[V, D]``."""

    def __init__(self, vocab_size: int, features: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (vocab_size, features), dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)


class RMSNorm(nnx.Module):
    """``x / rms(x) * weight`` over the last axis, computed in float32 and cast back (as in HF)."""

    def __init__(self, features: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


def rope_inverse_frequencies(config: DecoderConfig) -> np.ndarray:
    """``[head_dim / 2]`` rotary inverse frequencies, with Llama 3's scaling where configured."""
    hd = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    sc = config.rope_scaling
    if sc is not None:
        wavelength = 2 * math.pi / inv
        low_wl = sc.original_max_position_embeddings / sc.low_freq_factor
        high_wl = sc.original_max_position_embeddings / sc.high_freq_factor
        scaled = np.where(wavelength > low_wl, inv / sc.factor, inv)
        smooth = (sc.original_max_position_embeddings / wavelength - sc.low_freq_factor) / (
            sc.high_freq_factor - sc.low_freq_factor
        )
        medium = (wavelength >= high_wl) & (wavelength <= low_wl)
        inv = np.where(medium, (1 - smooth) * scaled / sc.factor + smooth * scaled, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x`` ``[B, T, H, hd]`` by ``positions`` ``[B, T]`` (halves, not interleaved pairs)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: ``q [B, T, H, hd]``, ``k, v [B, Hkv, S, hd]`` (head-major, the KV
    cache's layout: no transpose of the cache per step), ``mask [B, T, S]`` (True where a query
    sees a key) -> ``[B, T, H, hd]``. Scores and softmax in float32.

    The ``G = H / Hkv`` query heads that share a key/value head are stacked into one
    ``[B, Hkv, G*T, hd]`` operand, so both products are plain batched matrix products (1.4x faster
    forward and backward on the CPU than a 5-d einsum, ``benchmarks/lm_kd_step.py``).
    """
    b, t, h, hd = q.shape
    kv = k.shape[1]
    g = h // kv
    qh = q.reshape(b, t, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask[:, None, None], scores.reshape(b, kv, g, t, -1), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kv, g, t, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, block: int) -> jax.Array:
    """:func:`attend` for a causal ``mask`` (no query sees a later key), skipping the blocks above
    the diagonal: the queries of block ``i`` (``block`` rows each) meet only the keys of blocks
    ``0..i``. Equal to :func:`attend` wherever a query sees at least one key; about
    ``(n + 1) / 2n`` of its work for ``n`` blocks."""
    t = q.shape[1]
    outs = [
        attend(q[:, s : s + block], k[:, :, : s + block], v[:, :, : s + block], mask[:, s : s + block, : s + block])
        for s in range(0, t, block)
    ]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = Linear(d, h * hd, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, kv * hd, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, kv * hd, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * hd, d, bias=config.o_bias, dtype=dtype, rngs=rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, positions, mask, inv_freq, kv_cache=None, index=None, kernel=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]
        if kv_cache is not None:
            ck, cv = kv_cache
            start = (0, 0, index, 0)
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
            kv_cache = (k, v)
        if kernel is not None and kv_cache is None:  # a whole sequence: the decoder's attention kernel
            out = kernel(q, k, v, mask)
        else:
            out = attend(q, k, v, mask)
        out = out.reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), kv_cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, mask, inv_freq, kv_cache=None, index=None, kernel=None):
        a, kv_cache = self.self_attn(self.input_layernorm(x), positions, mask, inv_freq, kv_cache, index, kernel)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv_cache


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``S`` slots, which slots hold a real token, and the
    next slot to write. Slots are written in order for the whole batch; each row's positions are
    its own, so prompts of different lengths share one cache (padding slots stay invalid)."""

    keys: tuple[jax.Array, ...]  # per layer [B, Hkv, S, hd]
    values: tuple[jax.Array, ...]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # [] int32

    @classmethod
    def create(cls, config: DecoderConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, config.num_kv_heads, slots, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(
            keys=zeros,
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            valid=jnp.zeros((batch, slots), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def slots(self) -> int:
        return self.valid.shape[1]


def default_positions(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """Positions ``[B, T]``: restart at 0 in each segment; count only real tokens under a mask
    (so left padding gives the same positions as no padding); ``arange`` otherwise."""
    t = jnp.arange(shape[1], dtype=jnp.int32)
    if segment_ids is not None:
        starts = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )
        return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(t, shape)


CAUSAL_BLOCK = 64  # query rows per block of the causal attention of a whole sequence


def causal_block(t: int) -> int | None:
    """The query block of :func:`attend_causal` for sequences of ``t`` tokens: ``CAUSAL_BLOCK``
    when they are longer than one block (the last block may be shorter), else None (one
    :func:`attend`; also for a symbolic length, as ``jax.export`` traces one)."""
    return CAUSAL_BLOCK if isinstance(t, int) and t > CAUSAL_BLOCK else None


def check_token_ids(tokens, vocab_size: int, what: str = "tokens") -> None:
    """Refuse concrete token ids outside ``[0, vocab_size)`` (traced ids cannot be checked)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    a = np.asarray(tokens)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what}: expected integer token ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        bad = a[(a < 0) | (a >= vocab_size)]
        raise ValueError(f"{what}: {bad.size} id(s) outside the vocabulary [0, {vocab_size}), e.g. {int(bad.flat[0])}")


@functools.partial(nnx.remat, static_argnums=(5,))
def _remat_block(layer, x, positions, mask, inv_freq, kernel):
    return layer(x, positions, mask, inv_freq, None, None, kernel)


def set_attention(model: Decoder, kernel=None) -> Decoder:
    """The kernel of ``model``'s attention over whole sequences (training, scoring; not decoding
    with a KV cache): a :mod:`jkd.models.attention` kernel, e.g. ``FusedAttention("cudnn")``; None
    restores the default, :class:`~jkd.models.attention.BlockedAttention`. Returns ``model``."""
    model.attention = kernel
    return model


def set_remat(model: Decoder, on: bool = True) -> Decoder:
    """Activation checkpointing per decoder block: the backward pass recomputes each block from its
    input instead of keeping its activations (memory for about one more forward pass). The values
    and gradients are those without it. Returns ``model``."""
    model.remat = bool(on)
    return model


class Decoder(nnx.Module):
    """A causal language model: ``tokens [B, T] -> logits [B, T, V]`` (float32).

    Args:
      config: the architecture (see :class:`~jkd.models.decoder_config.DecoderConfig`).
      dtype: parameter and activation dtype (``jnp.float32`` or ``jnp.bfloat16``); norms,
        attention softmax and logits are computed in float32.
      rngs: initialisation (normal, std 0.02, as Hugging Face initialises these models).

    Features (``jkd.models.call_with_features``): ``layer1`` ... ``layerN`` (residual stream after
    each block) and ``final`` (after the last norm), each ``[B, T, D]``.
    """

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        # on every instance (not as class defaults), so that two decoders that differ only in
        # whether these were ever set have one graph definition, and one compiled step
        self.remat = False  # recompute each block's activations in the backward pass (set_remat)
        self.attention = None  # the whole-sequence attention kernel (set_attention); None: BlockedAttention
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def output_weight(self) -> jax.Array:
        """The output projection ``[V, D]`` (the embedding when tied): ``logits = h @ W.T``."""
        return (self.embed_tokens if self.lm_head is None else self.lm_head).weight[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[..., D] -> [..., V]`` float32."""
        return jnp.einsum("...d,vd->...v", hidden, self.output_weight(), preferred_element_type=jnp.float32)

    def _run(self, tokens, positions, mask, cache: KVCache | None, kernel=None):
        check_token_ids(tokens, self.config.vocab_size)
        inv_freq = rope_inverse_frequencies(self.config)
        x = self.embed_tokens(tokens)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            if self.remat and cache is None:  # training: keep only each block's input for the backward pass
                x, kv = _remat_block(layer, x, positions, mask, inv_freq, kernel)
            else:
                x, kv = layer(x, positions, mask, inv_freq, kv, None if cache is None else cache.index, kernel)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
            expose(self, f"layer{i + 1}", x)
        return expose(self, "final", self.norm(x)), (tuple(new_k), tuple(new_v))

    def hidden_states(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """``tokens [B, T]`` -> final hidden states ``[B, T, D]`` (before the output projection).

        ``attention_mask [B, T]`` (bool, True for real tokens) hides padding keys;
        ``segment_ids [B, T]`` keeps packed sequences apart; ``positions [B, T]`` default to
        :func:`default_positions`.
        """
        b, t = tokens.shape
        if positions is None:
            positions = default_positions(attention_mask, segment_ids, (b, t))
        idx = jnp.arange(t)
        mask = jnp.broadcast_to(idx[None, :] <= idx[:, None], (b, t, t))
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        return self._run(tokens, positions, mask, None, self.attention or BlockedAttention())[0]

    def __call__(self, tokens: jax.Array, **kwargs) -> jax.Array:
        """``tokens [B, T]`` -> ``logits [B, T, V]`` float32; keyword arguments as in
        :meth:`hidden_states`."""
        return self.logits(self.hidden_states(tokens, **kwargs))

    def decode(
        self,
        tokens: jax.Array,
        cache: KVCache,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Run ``tokens [B, T]`` after what ``cache`` holds: writes slots ``[index, index + T)``.

        ``attention_mask [B, T]`` marks real tokens (padding is written but never attended to);
        ``positions`` default to each row's count of real tokens so far. Returns ``logits
        [B, T, V]`` and the updated cache.
        """
        hidden, cache = self.decode_hidden(tokens, cache, attention_mask=attention_mask, positions=positions)
        return self.logits(hidden), cache

    def decode_hidden(
        self,
        tokens: jax.Array,
        cache: KVCache,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """:meth:`decode` before the output projection: ``[B, T, D]`` hidden states and the cache."""
        b, t = tokens.shape
        am = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            before = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]
            positions = before + jnp.maximum(jnp.cumsum(am.astype(jnp.int32), axis=1) - 1, 0)
        valid = jax.lax.dynamic_update_slice(cache.valid, am, (0, cache.index))
        slot = jnp.arange(cache.slots)
        q_slot = cache.index + jnp.arange(t)
        mask = (slot[None, None, :] <= q_slot[None, :, None]) & valid[:, None, :]
        hidden, (keys, values) = self._run(tokens, positions, mask, cache)
        return hidden, KVCache(keys=keys, values=values, valid=valid, index=cache.index + t)
