"""int8 quantization (qwix) against numpy float64 references of symmetric per-channel int8.

The convention checked is qwix's: ``scale = absmax / 127.5`` and ``q = clip(round(x / scale),
-128, 127)`` (absmax maps to the edge of the int8 range, then is clipped to 127); weights get
one scale per output channel, activations one per tensor, which a static scheme fixes from the
mean per-image absmax of the calibration images.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jkd.compress import quantization as Q
from jkd.models import create_model
from jkd.train import apply_model, create_train_state, freeze_model, objectives, train_step


@pytest.fixture(autouse=True)
def _standard_promotion():
    """qwix mixes int32 and float32 inside its ops, which the suite's strict promotion
    rejects; quantized models run under JAX's standard rules (as they do for users)."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _int8(x, scale):
    """Symmetric int8 in float64: ``clip(round(x / scale), -128, 127) * scale``."""
    return np.clip(np.round(np.asarray(x, np.float64) / scale), -128, 127) * scale


def _scale(absmax):
    return np.asarray(absmax, np.float64) / 127.5


def _weights_int8(w, stored):
    """Per-output-channel int8 weights of ``w [in, out]``, in float64.

    The absmax element of each column lands exactly on +-127.5, a rounding tie that float32
    resolves either way (-127 or -128) by an ulp of the scale: only there the stored value is
    taken, after checking it is one of the two; every other element must match exactly.
    """
    scale = _scale(np.abs(w).max(0, keepdims=True))
    ratio = w / scale
    q = np.clip(np.round(ratio), -128, 127)
    tie = np.abs(np.abs(ratio) - 127.5) < 1e-3
    stored_q = np.asarray(stored["qvalue"]).astype(np.float64)
    np.testing.assert_array_equal(stored_q[~tie], q[~tie])
    assert np.all(np.isin(stored_q[tie], (-128, -127, 127))) and np.all(np.sign(stored_q[tie]) == np.sign(ratio[tie]))
    q[tie] = stored_q[tie]
    return q * scale


def _stored_kernels(model):
    p = nnx.to_pure_dict(freeze_model(model)[1].params)
    return p["layers"][0]["kernel"]["array"], p["head"]["kernel"]["array"]


def _mlp():
    return create_model("mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, hidden=(32,))


def _float_weights(model):
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    return (
        f64(p["layers"][0]["kernel"]),
        f64(p["layers"][0]["bias"]),
        f64(p["head"]["kernel"]),
        f64(p["head"]["bias"]),
    )


def _logits(model, x):
    g, v = freeze_model(model)
    return np.asarray(apply_model(g, v.params, v.batch_stats, v.rest, x, train=False)[0], np.float64)


def _images(n, seed):
    return jax.random.normal(jax.random.key(seed), (n, 8, 8, 1), jnp.float32)


def test_int8_weights_match_the_reference():
    model = _mlp()
    w1, b1, w2, b2 = _float_weights(model)
    x = _images(16, 1)
    q = Q.quantize(model, x[:2], Q.INT8_WEIGHTS)
    xf = np.asarray(x, np.float64).reshape(16, -1)
    k1, k2 = _stored_kernels(q)
    wq1, wq2 = _weights_int8(w1, k1), _weights_int8(w2, k2)
    want = np.maximum(xf @ wq1 + b1, 0) @ wq2 + b2
    np.testing.assert_allclose(_logits(q, x), want, rtol=1e-4, atol=1e-5)
    # ... and it is really a different function from the float one (the check can fail).
    assert np.max(np.abs(_logits(model, x) - want)) > 1e-4
    g, v = freeze_model(q)
    assert Q.int8_fraction(v.params) > 0.95


def test_static_activation_scales_come_from_the_calibration_images():
    model = _mlp()
    w1, b1, w2, b2 = _float_weights(model)
    calib = _images(64, 2)
    q = Q.quantize(model, calib, Q.INT8_STATIC)
    k1, k2 = _stored_kernels(q)
    wq1, wq2 = _weights_int8(w1, k1), _weights_int8(w2, k2)
    cf = np.asarray(calib, np.float64).reshape(64, -1)
    s1 = _scale(np.abs(cf).max(1).mean())
    h_cal = np.maximum(_int8(cf, s1) @ wq1 + b1, 0)
    s2 = _scale(np.abs(h_cal).max(1).mean())
    x = np.asarray(_images(16, 3), np.float64)
    xf = x.reshape(16, -1)
    want = _int8(np.maximum(_int8(xf, s1) @ wq1 + b1, 0), s2) @ wq2 + b2
    got = _logits(q, jnp.asarray(x, jnp.float32))
    # float32 vs float64 may put a value on the other side of a rounding edge: allow one
    # int8 step of the head's input in a few places, nothing more.
    assert np.mean(np.abs(got - want) < 1e-4) > 0.95
    np.testing.assert_allclose(got, want, atol=s2 * np.abs(wq2).sum(0).max())


def test_convolutions_quantize_and_stay_close():
    model = create_model("cnn", num_classes=10, input_shape=(8, 8, 1), seed=0, width=8)
    x = _images(8, 4)
    ref = _logits(model, x)
    for scheme in Q.SCHEMES.values():
        q = Q.quantize(model, x, scheme)
        _, v = freeze_model(q)
        stored = {
            "/".join(str(getattr(k, "key", k)) for k in path): a
            for path, a in jax.tree_util.tree_flatten_with_path(v.params)[0]
        }
        qvalues = {k: a for k, a in stored.items() if "qvalue" in k}
        assert sorted(k.split("/")[0] for k in qvalues) == ["conv1", "conv2", "head"], scheme.name
        assert all(a.dtype == jnp.int8 for a in qvalues.values()), scheme.name
        err = np.max(np.abs(_logits(q, x) - ref)) / np.max(np.abs(ref))
        assert 0 < err < 0.1, (scheme.name, err)


def test_qat_trains_through_fake_quantization():
    model = _mlp()
    qat = Q.qat_model(model, _images(2, 5))
    tx = optax.adam(1e-2)
    graphdef, state = create_train_state(qat, tx, seed=0)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.params)), "QAT keeps float weights"
    view = lambda key, images: images.astype(jnp.float32) / 255.0  # noqa: E731
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, view_fn=view))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8),
        "label": rng.integers(0, 10, 32).astype(np.int32),
    }
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch, objectives.CrossEntropy())
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    trained = nnx.merge(graphdef, state.params, state.batch_stats, state.rest)
    q = Q.quantize(trained, _images(4, 6), Q.INT8_WEIGHTS)
    assert Q.int8_fraction(freeze_model(q)[1].params) > 0.95


def test_bad_input_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="normalised float images"):
        Q.quantize(model, np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="normalised float images"):
        Q.quantize(model, jnp.zeros((8, 8, 1)))
    with pytest.raises(TypeError, match="Int8Scheme"):
        Q.quantize(model, _images(2, 0), "int8")
    with pytest.raises(ValueError, match="dynamic"):
        Q.qat_model(model, _images(2, 0), Q.INT8_STATIC)


def test_a_saved_int8_student_loads_back(tmp_path):
    from jkd.jobs.image import ModelSpec, load_saved_model, model_meta
    from jkd.data.spec import DatasetSpec
    from jkd.train.checkpoint import save_frozen

    model = create_model("mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, hidden=(32,))
    q = Q.quantize(model, _images(32, 7), Q.INT8_STATIC)
    _, v = freeze_model(q)
    spec = DatasetSpec(name="toy", num_classes=10, image_shape=(8, 8, 1), mean=(0.5,), std=(0.25,), flip=False)
    meta = {**model_meta(ModelSpec("mlp", (("hidden", (32,)),)), spec, "distilled"), "quantization": Q.INT8_STATIC.name}
    save_frozen(tmp_path / "m", v, meta)
    g2, v2, meta2 = load_saved_model(tmp_path / "m")
    x = _images(8, 8)
    np.testing.assert_array_equal(_logits(nnx.merge(g2, v2.params, v2.batch_stats, v2.rest), x), _logits(q, x))
    assert meta2["quantization"] == Q.INT8_STATIC.name
