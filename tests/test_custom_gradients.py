"""Every custom VJP of jkd against numerical gradients (jax.test_util.check_grads, as optax's
tests do), in float64 so that central differences are accurate: no formula of the code under
test is reused here."""

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

from jkd import losses
from jkd.models.batchnorm import batch_norm_train


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _normal(seed, *shapes):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float64) for k, s in zip(keys, shapes)]


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4, 3)])
def test_batch_norm_train_in_all_three_outputs(shape):
    x, scale, bias = _normal(0, shape, shape[-1:], shape[-1:])
    wy, wm, wv = _normal(1, shape, shape[-1:], shape[-1:])

    def f(x, scale, bias):  # every output used, with unequal weights
        y, mean, var = batch_norm_train(x, scale, bias, 1e-3)
        return jnp.sum(wy * y) + jnp.sum(wm * mean) + jnp.sum(wv * jnp.sin(var))

    check_grads(f, (x, scale, bias), order=1, modes=("rev",), eps=1e-5, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("rows, chunk", [(7, 3), (8, 8)])
def test_chunked_soft_loss_in_both_logits(rows, chunk):
    s, t = _normal(2, (rows, 9), (rows, 9))
    s, t = 3 * s, 3 * t
    mask = jnp.arange(rows) != 2
    w = _normal(3, (rows,))[0]

    def f(s, t):
        return jnp.sum(w * losses.chunked_soft_distillation_loss(s, t, temperature=2.5, chunk_size=chunk, where=mask))

    check_grads(f, (s, t), order=1, modes=("rev",), eps=1e-5, atol=1e-7, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:jkd.losses.projected_soft_distillation_loss is deprecated")
@pytest.mark.parametrize("rows, chunk", [(11, 4), (6, 16)])
def test_projected_soft_loss_in_the_student_hidden_states_and_projection(rows, chunk):
    hs, ws, ht, wt = _normal(4, (rows, 5), (5, 13), (rows, 7), (7, 13))

    def f(hs, ws):  # the teacher is data: no gradient flows to it by design
        return losses.projected_soft_distillation_loss(hs, ws, ht, wt, temperature=1.5, chunk_size=chunk)

    check_grads(f, (hs, ws), order=1, modes=("rev",), eps=1e-5, atol=1e-7, rtol=1e-6)
    grads = jax.grad(lambda ht, wt: losses.projected_soft_distillation_loss(hs, ws, ht, wt), argnums=(0, 1))(ht, wt)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in grads)


def test_batch_norm_train_under_pmap_in_all_three_outputs():
    """The axis_name path (psum-ed statistics and backward sums): the gradient of the sum over
    devices of each device's output, against central differences of that same sum."""
    x, scale, bias = _normal(5, (4, 3, 2, 3), (3,), (3,))  # 4 devices x 3 rows x 2 x 3 channels
    wy, wm, wv = _normal(6, (4, 3, 2, 3), (4, 3), (4, 3))

    def per_device(x, scale, bias, wy, wm, wv):
        y, mean, var = batch_norm_train(x, scale, bias, 1e-3, "d")
        return jnp.sum(wy * y) + jnp.sum(wm * mean) + jnp.sum(wv * jnp.sin(var))

    def f(x, scale, bias):
        out = jax.pmap(per_device, axis_name="d", in_axes=(0, None, None, 0, 0, 0))(x, scale, bias, wy, wm, wv)
        return jnp.sum(out)

    check_grads(f, (x, scale, bias), order=1, modes=("rev",), eps=1e-5, atol=1e-7, rtol=1e-6)
