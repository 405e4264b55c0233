"""Magnitude pruning against numpy references written from the definitions (Zhu & Gupta, 2017)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd.compress import pruning


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {
            "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        },
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(36, 10)) * 0.1, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(10,)), jnp.float32),
        },
    }


def _reference_masks(params, sparsity, per_layer):
    """Independent: numpy float64, stable argsort, exactly floor(s * n) smallest |w| pruned."""
    names = ["conv", "dense"]
    kernels = [np.asarray(params[n]["kernel"], np.float64) for n in names]

    def keep(values):
        k = int(np.floor(sparsity * values.size))
        order = np.argsort(np.abs(values), kind="stable")
        m = np.ones(values.size, bool)
        m[order[:k]] = False
        return m

    if per_layer:
        return {n: keep(w.ravel()).reshape(w.shape) for n, w in zip(names, kernels)}
    flat = keep(np.concatenate([w.ravel() for w in kernels]))
    out, start = {}, 0
    for n, w in zip(names, kernels):
        out[n] = flat[start : start + w.size].reshape(w.shape)
        start += w.size
    return out


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8, 0.95])
def test_masks_match_the_reference(per_layer, sparsity):
    params = _params()
    masks = pruning.magnitude_masks(params, sparsity, per_layer=per_layer)
    ref = _reference_masks(params, sparsity, per_layer)
    for n in ("conv", "dense"):
        np.testing.assert_array_equal(np.asarray(masks[n]["kernel"]), ref[n])
        assert bool(jnp.all(masks[n]["bias"])), "biases are never pruned"


def test_global_pruning_keeps_more_of_the_layer_with_larger_weights():
    params = _params()  # the dense kernel is 10x smaller in scale
    report = pruning.sparsity_report(pruning.prune(params, 0.5)[0])
    assert report["layers"]["dense/kernel"]["sparsity"] > 0.5 > report["layers"]["conv/kernel"]["sparsity"]
    per_layer = pruning.sparsity_report(pruning.prune(params, 0.5, per_layer=True)[0])
    assert per_layer["layers"]["dense/kernel"]["sparsity"] == per_layer["layers"]["conv/kernel"]["sparsity"] == 0.5


def test_ties_prune_exactly_the_requested_count():
    params = {"w": jnp.ones((10, 10), jnp.float32)}
    masks = pruning.magnitude_masks(params, 0.37)
    assert int(jnp.sum(~masks["w"])) == 37


def test_sparsity_report_counts_zeros():
    params = {
        "a": {"kernel": jnp.asarray([[0.0, 1.0], [0.0, 0.0]], jnp.float32)},
        "b": {"bias": jnp.asarray([0.0, 2.0], jnp.float32)},
    }
    report = pruning.sparsity_report(params)
    assert report["layers"] == {"a/kernel": {"zeros": 3, "size": 4, "sparsity": 0.75}}
    assert report["prunable_sparsity"] == 0.75
    assert report["overall_sparsity"] == 4 / 6


def test_polynomial_schedule_matches_the_formula():
    sched = pruning.polynomial_sparsity(0.8, begin_step=10, end_step=110, initial=0.1)
    for t in [0, 9, 10, 35, 60, 109, 110, 500]:
        p = min(max((t - 10) / 100, 0.0), 1.0)
        want = 0.0 if t < 10 else 0.8 + (0.1 - 0.8) * (1 - p) ** 3
        np.testing.assert_allclose(float(sched(jnp.int32(t))), want, rtol=1e-6, atol=1e-7)
    values = [float(sched(jnp.int32(t))) for t in range(10, 200)]
    assert all(b >= a for a, b in zip(values, values[1:])), "the schedule never decreases"


def _toy_run(tx, params, steps):
    """Minimise sum((w - target)^2) with every target nonzero: the gradient pushes pruned
    weights away from zero, so only the transform keeps them there."""
    target = jax.tree.map(lambda p: jnp.full(p.shape, 2.0, p.dtype), params)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(
            lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))
        )(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append((params, state))
    return history


def test_transform_keeps_pruned_weights_at_zero_and_masks_never_revive():
    sched = pruning.polynomial_sparsity(0.75, begin_step=0, end_step=8)
    tx = optax.chain(optax.sgd(0.05), pruning.magnitude_pruning(sched, update_every=2))
    history = _toy_run(tx, _params(), 12)
    prev_pruned = None
    for i, (params, state) in enumerate(history):
        masks = state[1].masks
        for n in ("conv", "dense"):
            w, m = np.asarray(params[n]["kernel"]), np.asarray(masks[n]["kernel"])
            assert np.all(w[~m] == 0.0), f"step {i}: a pruned weight is not exactly zero"
        pruned = np.concatenate([~np.asarray(masks[n]["kernel"]).ravel() for n in ("conv", "dense")])
        if prev_pruned is not None:
            assert np.all(pruned[prev_pruned]), f"step {i}: a pruned weight came back"
        prev_pruned = pruned
    final = pruning.sparsity_report(history[-1][0])
    assert final["prunable_sparsity"] == pytest.approx(np.floor(0.75 * (72 + 360)) / (72 + 360))
    assert final["layers"]  # biases are not in the report's layers
    assert all(np.all(np.asarray(history[-1][0][n]["bias"]) != 0) for n in ("conv", "dense"))


def test_transform_with_a_constant_sparsity_and_its_errors():
    tx = pruning.magnitude_pruning(0.5)
    params = _params()
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert pruning.sparsity_report(new)["prunable_sparsity"] == 0.5
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(updates, state)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pruning.magnitude_masks(_params(), 1.0), r"\[0, 1\)"),
        (lambda: pruning.magnitude_masks(_params(), -0.1), r"\[0, 1\)"),
        (lambda: pruning.magnitude_pruning(1.5), r"\[0, 1\)"),
        (lambda: pruning.magnitude_pruning(0.5, update_every=0), "update_every"),
        (lambda: pruning.polynomial_sparsity(0.5, begin_step=10, end_step=10), "begin_step < end_step"),
        (lambda: pruning.polynomial_sparsity(0.5, begin_step=0, end_step=10, initial=0.6), "must not decrease"),
    ],
)
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pruning_inside_a_distillation_step_of_a_real_model():
    from jkd.models import create_model
    from jkd.train import create_train_state, objectives, train_step
    from jkd.train import freeze_model

    teacher_graphdef, teacher = freeze_model(
        create_model("mlp", num_classes=10, input_shape=(8, 8, 1), seed=1, hidden=(32,))
    )
    tx = optax.chain(optax.adam(1e-2), pruning.magnitude_pruning(0.6))
    graphdef, state = create_train_state(
        create_model("mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, hidden=(16,)), tx, seed=0
    )
    view = lambda key, images: images.astype(jnp.float32) / 255.0  # noqa: E731
    step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, view_fn=view, teacher_graphdef=teacher_graphdef)
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam (see jkd.train.optim)
        for _ in range(3):
            state, metrics = step(
                state, batch, objectives.SoftKD(temperature=4.0, kd_weight=0.9, ce_weight=0.1), teacher
            )
    assert np.isfinite(float(metrics["loss"]))
    report = pruning.sparsity_report(state.params)
    n = 64 * 16 + 16 * 10
    assert report["prunable_sparsity"] == pytest.approx(np.floor(0.6 * n) / n)
