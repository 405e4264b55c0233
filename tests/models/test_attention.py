"""Causal attention in blocks of query rows: the same values and gradients as one block, under
padding, packed segments and grouped-query heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd.models.decoder import attend, attend_causal


def _inputs(t, seed=0):
    rng = np.random.default_rng(seed)
    b, h, kv, hd = 3, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, h, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kv, t, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kv, t, hd)), jnp.float32)
    real = np.ones((b, t), bool)
    real[1, t - 17:] = False  # right padding
    real[2, :9] = False  # left padding
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3:] = 2  # row 0: two packed sequences
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
    g_blk = jax.grad(lambda *a: loss(lambda q, k, v: attend_causal(q, k, v, mask, block=block), *a),
                     argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_blk, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
