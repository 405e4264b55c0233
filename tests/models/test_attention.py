"""Causal attention in blocks of query rows: the same values and gradients as one block, under
padding, packed segments and grouped-query heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd.models.attention import BlockedAttention, FusedAttention, SplashAttention
from jkd.models.decoder import attend, attend_causal


def _inputs(t, seed=0):
    rng = np.random.default_rng(seed)
    b, h, kv, hd = 3, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, h, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kv, t, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kv, t, hd)), jnp.float32)
    real = np.ones((b, t), bool)
    real[1, t - 17 :] = False  # right padding
    real[2, :9] = False  # left padding
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3 :] = 2  # row 0: two packed sequences
    i = np.arange(t)
    mask = (i[None, :] <= i[:, None])[None] & real[:, None, :] & (seg[:, :, None] == seg[:, None, :])
    return q, k, v, jnp.asarray(mask), real


@pytest.mark.parametrize("t, block", [(130, 64), (128, 32), (40, 64)])
def test_blocks_equal_one_attention(t, block):
    q, k, v, mask, real = _inputs(t)
    full = attend(q, k, v, mask)
    blocked = attend_causal(q, k, v, mask, block=block)
    assert blocked.shape == full.shape
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(full)[real], atol=1e-6, rtol=1e-6)
    # gradients through the real query rows (padded rows see no key: their output is never used)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(full.shape) * real[:, :, None, None], jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    g_full = jax.grad(lambda *a: loss(lambda q, k, v: attend(q, k, v, mask), *a), argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.grad(lambda *a: loss(lambda q, k, v: attend_causal(q, k, v, mask, block=block), *a), argnums=(0, 1, 2))(
        q, k, v
    )
    for a, b in zip(g_blk, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-5)  # gradients up to ~150


def _attention64(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v per head in float64 numpy, each query head reading its group's
    key/value head; masked keys excluded."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, hd = q.shape
    g = h // k.shape[1]
    out = np.zeros_like(q)
    for head in range(h):
        s = np.einsum("btd,bsd->bts", q[:, :, head], k[:, head // g]) / np.sqrt(hd)
        s = np.where(mask, s, -1e300)  # a query that sees no key (left padding) is not compared
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, head] = np.einsum("bts,bsd->btd", p / p.sum(-1, keepdims=True), v[:, head // g])
    return out


KERNELS = {"fused": lambda: FusedAttention("xla"), "splash": lambda: SplashAttention(interpret=True, block=128)}


@pytest.mark.parametrize("kernel, t", [("fused", 40), ("fused", 130), ("splash", 128), ("splash", 256)])
def test_each_kernel_matches_float64_attention_with_gradients(kernel, t):
    """FusedAttention passes grouped-query heads, padding and packed segments to
    jax.nn.dot_product_attention as cuDNN's kernel takes them (checked here with implementation
    "xla", the same call on the CPU); SplashAttention runs the TPU's Pallas kernel in interpret mode,
    its segments taken from the mask and the key/value heads repeated. Values against a float64
    formula, gradients against jkd's blocked attention."""
    q, k, v, mask, real = _inputs(t, seed=3)
    fn = KERNELS[kernel]()
    out = fn(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out)[real], _attention64(q, k, v, np.asarray(mask))[real], atol=2e-6)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(out.shape) * real[:, :, None, None], jnp.float32)
    grads = [
        jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v, mask) * w), argnums=(0, 1, 2))(q, k, v)
        for f in (fn, BlockedAttention())
    ]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in grads[0]) > 1e-2


def test_a_decoder_with_the_fused_kernel_equals_the_default():
    """set_attention changes the kernel, not the model: logits and gradients on a padded, packed
    batch equal the default's; decoding with a KV cache is unaffected."""
    from flax import nnx

    from jkd.models.attention import FusedAttention
    from jkd.models.decoder import Decoder, set_attention
    from jkd.models.decoder_config import DecoderConfig

    cfg = DecoderConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
    )
    plain = Decoder(cfg, rngs=nnx.Rngs(0))
    fused = set_attention(nnx.clone(plain), FusedAttention("xla"))
    assert nnx.graphdef(fused) != nnx.graphdef(plain)  # the kernel is part of the graph definition
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 80)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 50 + [2] * 30, [1] * 80], 1, axis=0), jnp.int32)
    real = jnp.asarray(np.arange(80)[None] < np.array([[80], [61]]))

    def loss(model):
        return jnp.sum(model(tokens, attention_mask=real, segment_ids=seg) * real[..., None].astype(jnp.float32))

    (lp, gp), (lf, gf) = (nnx.value_and_grad(loss)(m) for m in (plain, fused))
    np.testing.assert_allclose(float(lf), float(lp), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-5)  # gradients up to ~150


def test_the_kernel_for_each_backend():
    from jkd.models.attention import BlockedAttention, FusedAttention, for_backend

    assert for_backend("gpu", jnp.bfloat16) == FusedAttention("cudnn")
    assert for_backend("gpu", jnp.float32) == BlockedAttention()  # cuDNN's kernel takes no float32
    assert for_backend("cpu", jnp.bfloat16) == BlockedAttention()
    from jkd.models.attention import SplashAttention

    assert for_backend("tpu", jnp.float32) == SplashAttention()
    assert for_backend("tpu", jnp.float32, devices=4) == BlockedAttention()  # not yet placed per device
    assert "cuDNN flash attention" in FusedAttention("cudnn").description


def test_the_splash_kernel_takes_the_blocked_path_off_its_block_unit():
    from jkd.models.attention import BlockedAttention, SplashAttention

    q, k, v, mask, real = _inputs(40)  # not a multiple of 128
    np.testing.assert_array_equal(
        np.asarray(SplashAttention(interpret=True)(q, k, v, mask)), np.asarray(BlockedAttention()(q, k, v, mask))
    )
