"""The deprecated fused-projection soft loss (now projected_token_divergence with [d, V] weights and
T^2) against numpy float64 formulas, value and gradients; and its deprecation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import losses

# The tests of the formula call the deprecated name on purpose; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:jkd.losses.projected_soft_distillation_loss is deprecated")


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _reference(hs, ws, ht, wt, T):
    """Hinton's T^2 KL(p_T || q_T), mean over rows, and its gradients, written out by hand."""
    hs, ws, ht, wt = (np.asarray(a, np.float64) for a in (hs, ws, ht, wt))
    hs2 = hs.reshape(-1, hs.shape[-1])
    p = _softmax(ht.reshape(-1, ht.shape[-1]) @ wt / T)
    q = _softmax(hs2 @ ws / T)
    n = len(p)
    loss = np.mean(T**2 * np.sum(p * (np.log(p) - np.log(q)), -1))
    ds = T * (q - p) / n
    return loss, (ds @ ws.T).reshape(hs.shape), hs2.T @ ds


@pytest.mark.parametrize("rows_shape, chunk", [((37,), 8), ((3, 5), 4), ((16,), 16), ((5,), 64)])
def test_value_and_gradients_match_the_formula(rows_shape, chunk):
    k = jax.random.split(jax.random.key(0), 4)
    hs = jax.random.normal(k[0], (*rows_shape, 6))
    ws = jax.random.normal(k[1], (6, 30))
    ht = jax.random.normal(k[2], (*rows_shape, 9))
    wt = jax.random.normal(k[3], (9, 30))
    T = 2.5
    fn = lambda a, b, c_, d: losses.projected_soft_distillation_loss(a, b, c_, d, temperature=T, chunk_size=chunk)  # noqa: E731
    value, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(hs, ws, ht, wt)
    loss, dhs, dws = _reference(hs, ws, ht, wt, T)
    np.testing.assert_allclose(float(value), loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]), dhs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), dws, rtol=1e-4, atol=1e-6)
    assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3])), "the teacher is frozen"
    # jit gives the same, and a scaled loss scales the gradients (the cotangent is applied)
    np.testing.assert_allclose(float(jax.jit(fn)(hs, ws, ht, wt)), loss, rtol=1e-5)
    g3 = jax.grad(lambda a: 3.0 * fn(a, ws, ht, wt))(hs)
    np.testing.assert_allclose(np.asarray(g3), 3 * dhs, rtol=1e-4, atol=1e-6)


def test_equals_the_unfused_loss():
    k = jax.random.split(jax.random.key(1), 4)
    hs, ws = jax.random.normal(k[0], (20, 8)), jax.random.normal(k[1], (8, 40))
    ht, wt = jax.random.normal(k[2], (20, 8)), jax.random.normal(k[3], (8, 40))
    plain = jnp.mean(losses.soft_distillation_loss(hs @ ws, ht @ wt, temperature=4.0))
    fused = losses.projected_soft_distillation_loss(hs, ws, ht, wt, temperature=4.0, chunk_size=6)
    np.testing.assert_allclose(float(fused), float(plain), rtol=1e-5)
    assert float(
        losses.projected_soft_distillation_loss(hs, ws, hs, ws, temperature=2.0, chunk_size=7)
    ) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "args, kw, match",
    [
        (((4, 3), (5, 10), (4, 3), (3, 10)), {}, "projections must be"),
        (((4, 3), (3, 10), (4, 3), (3, 12)), {}, "projections must be"),
        (((4, 3), (3, 10), (5, 3), (3, 10)), {}, "same leading shape"),
        (((4, 3), (3, 10), (4, 3), (3, 10)), {"chunk_size": 0}, "chunk_size"),
        (((4, 3), (3, 10), (4, 3), (3, 10)), {"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_input(args, kw, match):
    arrays = [jnp.ones(s) for s in args]
    with pytest.raises(ValueError, match=match):
        losses.projected_soft_distillation_loss(*arrays, **kw)


@pytest.mark.filterwarnings("default")
def test_the_deprecated_name_warns_and_is_the_one_fused_loss():
    k = jax.random.split(jax.random.key(2), 4)
    hs, ws = jax.random.normal(k[0], (10, 6)), jax.random.normal(k[1], (6, 24))
    ht, wt = jax.random.normal(k[2], (10, 5)), jax.random.normal(k[3], (5, 24))
    with pytest.warns(DeprecationWarning, match="use projected_token_divergence"):
        old = losses.projected_soft_distillation_loss(hs, ws, ht, wt, temperature=3.0, chunk_size=4)
    new = 9.0 * losses.projected_token_divergence(hs, ws.T, ht, wt.T, temperature=3.0, chunk_size=4)
    assert float(old) == float(new)
