"""jkd's BatchNorm: its training path against float64 formulas from Ioffe & Szegedy (2015), and
against flax's BatchNorm where it must behave the same (running statistics, evaluation,
fallbacks, variables)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jkd.models import create_model
from jkd.models.batchnorm import BatchNorm, batch_norm_train, channel_sum

EPS = 1e-5


def _reference(x, gamma, beta, dy, eps=EPS):
    """Ioffe & Szegedy (2015), Algorithm 1 and the backward pass of section 3, in float64."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    dy = dy.reshape(x.shape).astype(np.float64)
    m = x.shape[0]
    mu = x.mean(0)
    var = ((x - mu) ** 2).mean(0)
    x_hat = (x - mu) / np.sqrt(var + eps)
    y = gamma * x_hat + beta
    dx_hat = dy * gamma
    dvar = np.sum(dx_hat * (x - mu), 0) * -0.5 * (var + eps) ** -1.5
    dmu = np.sum(dx_hat * -1 / np.sqrt(var + eps), 0) + dvar * np.sum(-2 * (x - mu), 0) / m
    dx = dx_hat / np.sqrt(var + eps) + dvar * 2 * (x - mu) / m + dmu / m
    return y, mu, var, dx, np.sum(dy * x_hat, 0), np.sum(dy, 0)


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 4, c) + rng.uniform(-3, 3, c)).astype(np.float32)
    return (
        x,
        rng.uniform(0.5, 2, c).astype(np.float32),
        rng.standard_normal(c).astype(np.float32),
        rng.standard_normal(shape).astype(np.float32),
    )


# rows split by 1, 16, 8, 8, 64 in channel_sum
@pytest.mark.parametrize("shape", [(7, 3), (16, 6), (8, 5, 5, 7), (4, 3, 3, 2, 3), (64, 4, 4, 5)])
def test_forward_and_gradients_match_the_paper_in_float64(shape):
    x, gamma, beta, dy = _data(shape)
    y_ref, mu_ref, var_ref, dx_ref, dgamma_ref, dbeta_ref = _reference(x, gamma, beta, dy)
    y, mean, var = jax.jit(batch_norm_train, static_argnums=3)(x, gamma, beta, EPS)
    np.testing.assert_allclose(y.reshape(y_ref.shape), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, mu_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)

    loss = lambda x, g, b: jnp.sum(batch_norm_train(x, g, b, EPS)[0] * dy)  # noqa: E731
    dx, dgamma, dbeta = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gamma, beta)
    np.testing.assert_allclose(dx.reshape(dx_ref.shape), dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-5, atol=1e-5)


def test_gradients_through_the_returned_statistics():
    """d(a . mean)/dx = a / m and d(b . var)/dx = 2 b (x - mu) / m (float64)."""
    x, gamma, beta, _ = _data((32, 4), seed=1)
    a, b = np.array([1.0, -2.0, 0.5, 3.0], np.float32), np.array([0.3, 1.0, -1.0, 2.0], np.float32)

    def loss(x):
        _, mean, var = batch_norm_train(x, gamma, beta, EPS)
        return jnp.sum(a * mean) + jnp.sum(b * var)

    x64 = x.astype(np.float64)
    expected = a / 32 + 2 * b * (x64 - x64.mean(0)) / 32
    np.testing.assert_allclose(jax.grad(loss)(x), expected, rtol=1e-5, atol=1e-6)


def test_channel_sum_on_the_cpu_is_the_row_sum():
    x = np.random.default_rng(2).standard_normal((4096, 5)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(channel_sum)(x), x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)


def test_other_platforms_lower_the_plain_reduction():
    """``platform_dependent`` keeps the ``ones @ x`` product to the CPU: lowered for a TPU the
    step holds no dot at all, lowered for the CPU it does."""
    x = jax.ShapeDtypeStruct((64, 8), jnp.float32)
    lowered = {p: jax.export.export(jax.jit(channel_sum), platforms=[p])(x) for p in ("cpu", "tpu")}
    texts = {p: e.mlir_module() for p, e in lowered.items()}
    assert "dot_general" in texts["cpu"]
    assert "dot_general" not in texts["tpu"] and "reduce" in texts["tpu"]


def _module_pair(features=6, **kwargs):
    ours = BatchNorm(features, momentum=0.9, epsilon=EPS, rngs=nnx.Rngs(0), **kwargs)
    theirs = nnx.BatchNorm(features, momentum=0.9, epsilon=EPS, rngs=nnx.Rngs(0), **kwargs)
    for m in (ours, theirs):
        m.scale[...] = jnp.linspace(0.5, 2.0, features)
        if m.bias is not None:
            m.bias[...] = jnp.linspace(-1.0, 1.0, features)
    return ours, theirs


def _train_call(module, x):
    graphdef, state = nnx.split(module)

    def f(x, state):
        m = nnx.merge(graphdef, state)
        m.train()
        return jnp.sum(jnp.sin(m(x))), nnx.state(m)

    (loss, new_state), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, state)
    return loss, grads, new_state


def test_module_matches_flax_batchnorm_in_training_and_evaluation():
    ours, theirs = _module_pair()
    x = _data((8, 5, 5, 6), seed=3)[0]
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
    (l1, g1, s1), (l2, g2, s2) = _train_call(ours, x), _train_call(theirs, x)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Running statistics: momentum * old + (1 - momentum) * batch (flax's rule, biased variance).
    x64 = x.reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(s1["mean"][...], 0.1 * x64.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1["var"][...], 0.9 + 0.1 * x64.var(0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    nnx.update(ours, s1)
    nnx.update(theirs, s2)
    ours.eval(), theirs.eval()
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_uncovered_settings_fall_back_to_flax():
    x = _data((8, 6), seed=4)[0]
    mask = np.ones((8, 6), bool)
    mask[:2] = False
    ours, theirs = _module_pair()
    ours.train(), theirs.train()
    np.testing.assert_allclose(ours(x, mask=mask), theirs(x, mask=mask), rtol=1e-5, atol=1e-6)
    ours, theirs = _module_pair(use_bias=False)
    ours.train(), theirs.train()
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_vmapped_students_normalise_each_student_on_its_own():
    """vmap over students (``train_step_many``): each student's statistics and gradients are its
    own, forward and backward (float64 reference per student)."""
    x, _, _, dy = _data((3, 16, 4), seed=5)  # 3 students' batches
    gammas = np.stack([_data((16, 4), seed=10 + k)[1] for k in range(3)])
    betas = np.stack([_data((16, 4), seed=10 + k)[2] for k in range(3)])
    bn = jax.vmap(batch_norm_train, in_axes=(0, 0, 0, None))
    y = bn(x, gammas, betas, EPS)[0]
    loss = lambda x, g, b: jnp.sum(bn(x, g, b, EPS)[0] * dy)  # noqa: E731
    dx, dgamma, dbeta = jax.grad(loss, argnums=(0, 1, 2))(x, gammas, betas)
    for k in range(3):
        y_ref, _, _, dx_ref, dgamma_ref, dbeta_ref = _reference(x[k], gammas[k], betas[k], dy[k])
        np.testing.assert_allclose(y[k], y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx[k], dx_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dgamma[k], dgamma_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dbeta[k], dbeta_ref, rtol=1e-5, atol=1e-5)


def test_rematerialised_and_sharded_calls_agree():
    """Under ``jax.checkpoint`` and with the batch sharded over the 4 test devices (``jit`` on a
    mesh, automatic and explicit axes) the values and gradients are the plain ones."""
    x, gamma, beta, dy = _data((32, 3, 3, 5), seed=6)
    loss = lambda x, g, b: jnp.sum(batch_norm_train(x, g, b, EPS)[0] * dy)  # noqa: E731
    plain = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, gamma, beta)
    remat = jax.jit(jax.value_and_grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(x, gamma, beta)
    results = [remat]
    for axis_type in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):  # jkd's mesh is Auto
        mesh = jax.make_mesh((len(jax.devices()),), ("batch",), axis_types=(axis_type,))
        sharded_x = jax.device_put(x, jax.NamedSharding(mesh, jax.P("batch")))
        results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(sharded_x, gamma, beta))
    for other in results:
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_zoo_models_use_it():
    model = create_model("resnet8", num_classes=10, input_shape=(32, 32, 3))
    kinds = {type(m) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)}
    assert kinds == {BatchNorm}


def test_under_pmap_the_fast_path_uses_the_global_batch(monkeypatch):
    """With an axis_name (pmap), the statistics and the backward reductions are over every
    device's rows: outputs and gradients equal Ioffe & Szegedy's on the whole batch, and flax's
    BatchNorm under the same pmap."""
    import jkd.models.batchnorm as B

    x, gamma, beta, dy = _data((16, 3, 3, 5), seed=3)
    shard = lambda a: a.reshape(4, 4, *a.shape[1:])  # noqa: E731
    calls = []
    real = B.batch_norm_train
    monkeypatch.setattr(B, "batch_norm_train", lambda *a: calls.append(a[-1]) or real(*a))

    def run(cls):
        def loss(x, scale, bias, dy):
            bn = cls(5, axis_name="data", rngs=nnx.Rngs(0))
            bn.scale[...], bn.bias[...] = scale, bias
            y = bn(x, use_running_average=False)
            return jnp.sum(dy * y), (y, bn.mean[...], bn.var[...])

        grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
        return jax.pmap(grad, axis_name="data", in_axes=(0, None, None, 0))(shard(x), gamma, beta, shard(dy))

    (dx, dscale, dbias), (y, mean, var) = run(BatchNorm)
    assert calls == ["data"]  # the fast path ran, with the axis name
    ry, rmu, rvar, rdx, rdscale, rdbias = _reference(x, gamma, beta, dy)
    np.testing.assert_allclose(np.asarray(y).reshape(ry.shape), ry, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx).reshape(rdx.shape), rdx, rtol=1e-4, atol=1e-5)
    # Each device's copy of scale/bias gets its own rows' share; the shares sum to the whole.
    np.testing.assert_allclose(np.asarray(dscale).sum(0), rdscale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dbias).sum(0), rdbias, rtol=1e-4, atol=1e-5)
    for device in range(4):  # running statistics (momentum 0.99, from 0 and 1) of the global batch
        np.testing.assert_allclose(np.asarray(mean[device]), 0.01 * rmu, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(var[device]), 0.99 + 0.01 * rvar, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(B, "batch_norm_train", real)
    flax_out = run(nnx.BatchNorm)
    for ours, theirs in zip(jax.tree.leaves(((dx, dscale, dbias), (y, mean, var))), jax.tree.leaves(flax_out)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=2e-5)
