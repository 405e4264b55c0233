"""The decoder's projection with its own gradient (`jkd.models.decoder.linear`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd.models.decoder import Decoder, linear
from jkd.models.decoder_config import DecoderConfig


def test_values_and_gradients_equal_the_float64_formulas():
    rng = np.random.default_rng(0)
    x, w, dy = rng.normal(size=(2, 3, 5)), rng.normal(size=(4, 5)), rng.normal(size=(2, 3, 4))
    y, vjp = jax.vjp(linear, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    # y = x W^T; dL/dx = dy W; dL/dW = sum over tokens of dy^T x
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bto,bti->oi", dy, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5)])
def test_numerical_gradient(shape):
    from jax.test_util import check_grads

    rng = np.random.default_rng(1)
    with jax.enable_x64():
        x, w = jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=(4, 5)))
        check_grads(linear, (x, w), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_a_decoders_gradient_equals_the_plain_products():
    """The whole decoder's parameter gradients with the custom rule and with ``jnp.einsum``'s own."""
    from flax import nnx

    import jkd.models.decoder as D

    cfg = DecoderConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 40, (2, 9)), jnp.int32)

    def grads():
        return jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens) ** 2))(state)

    custom = grads()
    with pytest.MonkeyPatch.context() as mp:  # the product alone swapped; biases and the rest as they are
        mp.setattr(D, "linear", lambda x, w: jnp.einsum("...i,oi->...o", x, w))
        plain = grads()
    for a, b in zip(jax.tree.leaves(custom), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
