"""A jitted sampler for :class:`~jkd.models.decoder.Decoder`: prefill, then decode with a KV cache.

Greedy, temperature, top-k and top-p sampling; batches of prompts of different lengths; stop
tokens and a maximum length; reproducible from a key. Prompts are right-padded to a length bucket
(powers of two from 16 by default), so every prompt length within a bucket reuses one compiled
program: ``generate`` compiles once per (bucket, batch size, ``max_new_tokens``, sampling
settings). The whole decode loop is one ``lax.while_loop`` that stops when every row has stopped.

It is what on-policy distillation calls inside training: :func:`generate_tokens` is the pure,
jittable core on arrays; :func:`generate` is the host-side entry point on lists of prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jkd.models.decoder import Decoder, KVCache, check_token_ids

DEFAULT_BUCKETS = tuple(2**i for i in range(4, 16))  # 16 ... 32768
MAX_STOP_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    ``temperature=0`` is greedy (argmax). Otherwise logits are divided by ``temperature``, then
    only the ``top_k`` most likely tokens are kept (if set), then only the smallest set of the most
    likely tokens whose probability reaches ``top_p`` (if set; the most likely token is always kept),
    and a token is drawn from the renormalised distribution, as ``transformers`` orders them.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingConfig.temperature: got {self.temperature}, expected >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"SamplingConfig.top_k: got {self.top_k!r}, expected a positive integer or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p: got {self.top_p}, expected 0 < top_p <= 1 or None")


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """``logits [B, V]`` -> tempered logits with the tokens top-k / top-p exclude set to ``-inf``."""
    x = logits.astype(jnp.float32) / config.temperature
    neg = jnp.array(-jnp.inf, jnp.float32)
    if config.top_k is not None and config.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, config.top_k)[0][..., -1:]
        x = jnp.where(x < kth, neg, x)
    if config.top_p is not None and config.top_p < 1:
        order = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(order, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.where(before < config.top_p, order, jnp.inf)
        x = jnp.where(x < jnp.min(kept, axis=-1, keepdims=True), neg, x)
    return x


def sample_logits(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token per row of ``logits [B, V]`` -> ``[B]`` int32."""
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(jnp.int32)


def generate_tokens(
    model: Decoder,
    tokens: jax.Array,
    lengths: jax.Array,
    key: jax.Array,
    stop_tokens: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """The pure core: ``tokens [B, P]`` right-padded prompts of ``lengths [B]`` ->
    ``(new [B, max_new_tokens] int32, new_lengths [B])``.

    A row stops after emitting any of ``stop_tokens`` (``[K]``, ``-1`` entries ignored; the stop
    token is included in its output) or after ``max_new_tokens``; positions past a row's end
    hold ``pad_id``.
    """
    b, p = tokens.shape
    cache = KVCache.create(model.config, b, p + max_new_tokens, model.dtype)
    prompt_mask = jnp.arange(p)[None, :] < lengths[:, None]
    hidden, cache = model.decode_hidden(tokens, cache, attention_mask=prompt_mask)
    last = model.logits(hidden[jnp.arange(b), lengths - 1])

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, key, logits, cache, out, done, n = carry
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, sample_logits(logits, sub, sampling))
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
        n = n + (~done).astype(jnp.int32)
        alive = ~done
        done = done | jnp.any(tok[:, None] == stop_tokens[None, :], axis=-1)
        h, cache = model.decode_hidden(tok[:, None], cache, attention_mask=alive[:, None])
        return step + 1, key, model.logits(h[:, 0]), cache, out, done, n

    init = (
        jnp.zeros((), jnp.int32),
        key,
        last,
        cache,
        jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
    )
    _, _, _, _, out, _, n = jax.lax.while_loop(cond, body, init)
    return out, n


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "pad_id"))
def _generate_jit(graphdef, state, tokens, lengths, key, stop_tokens, *, max_new_tokens, sampling, pad_id):
    model = nnx.merge(graphdef, state)
    return generate_tokens(
        model, tokens, lengths, key, stop_tokens, max_new_tokens=max_new_tokens, sampling=sampling, pad_id=pad_id
    )


def stop_token_array(stop_tokens: Sequence[int]) -> jax.Array:
    """``[MAX_STOP_TOKENS]`` int32 stop ids padded with ``-1`` (a fixed shape: no recompilation
    when the number of stop tokens changes)."""
    stops = tuple(int(t) for t in stop_tokens)
    if len(stops) > MAX_STOP_TOKENS:
        raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stops)}")
    return jnp.asarray(stops + (-1,) * (MAX_STOP_TOKENS - len(stops)), jnp.int32)


def default_pad_id(config) -> int:
    """The id that fills positions past a row's end: the config's pad id, else 0."""
    return 0 if config.pad_token_id is None else int(config.pad_token_id)


def compiled_programs() -> int:
    """How many programs :func:`generate` has compiled in this process (for tests and benchmarks)."""
    return _generate_jit._cache_size()


@dataclasses.dataclass(frozen=True)
class Generation:
    """``tokens [B, max_new_tokens]`` int32 (padded past each row's end) and ``lengths [B]``."""

    tokens: np.ndarray
    lengths: np.ndarray

    def rows(self) -> list[np.ndarray]:
        """Each row's generated tokens, stop token included."""
        return [t[:n] for t, n in zip(self.tokens, self.lengths)]


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket that holds ``n`` tokens."""
    for bkt in sorted(buckets):
        if bkt >= n:
            return bkt
    raise ValueError(f"a prompt of {n} tokens is longer than the largest bucket ({max(buckets)})")


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | int = 0,
    stop_tokens: Sequence[int] | None = None,
    pad_id: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> Generation:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Args:
      model: the decoder (its parameters may be sharded over a mesh).
      prompts: ``B`` token-id sequences of any lengths (>= 1).
      max_new_tokens: the most tokens to add to each prompt.
      sampling: greedy by default; see :class:`SamplingConfig`.
      key: a ``jax.random`` key or an integer seed; the same key gives the same tokens.
      stop_tokens: a row stops after one of these (default: the config's ``eos_token_id``).
      pad_id: fills positions past a row's end (default: the config's pad id, else 0).
      buckets: prompt-length buckets; prompts are right-padded to the smallest that fits.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise ValueError("generate: no prompts")
    cfg = model.config
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise ValueError(f"generate: prompt {int(np.argmin(lengths))} is empty; every prompt needs a token")
    p = bucket_length(int(lengths.max()), buckets)
    if p + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"generate: {p} prompt slots + {max_new_tokens} new tokens exceed the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    pad = default_pad_id(cfg) if pad_id is None else pad_id
    tokens = np.full((len(prompts), p), pad, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = np.asarray(prompt)
    check_token_ids(tokens, cfg.vocab_size, "generate: prompts")
    stop_arr = stop_token_array(cfg.eos_token_ids if stop_tokens is None else stop_tokens)
    if isinstance(key, int):
        key = jax.random.key(key)
    graphdef, state = nnx.split(model)
    out, n = _generate_jit(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        key,
        stop_arr,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        pad_id=int(pad),
    )
    return Generation(tokens=np.asarray(out), lengths=np.asarray(n))
