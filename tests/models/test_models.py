"""The zoo: shapes, features, published sizes, independent FLOP counts, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jkd.models import MODELS, call_with_features, create_model, model_stats

CIFAR = (32, 32, 3)

# Parameter counts for CIFAR-100 published with the distillation benchmarks (Tian et al.,
# CRD, ICLR 2020, and its model zoo), which use 1x1-conv shortcuts.
PUBLISHED_PARAMS_M = {
    "resnet8": 0.08,
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet44": 0.67,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "mobilenetv2": 0.81,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_counts_match_published(name):
    # built abstractly (shapes only): counting needs no initialised weights
    m = nnx.eval_shape(lambda: create_model(name, num_classes=100, input_shape=CIFAR))
    params = model_stats(m, CIFAR).params / 1e6
    # Published figures have two decimals: allow their rounding (0.005M) or 2%, whichever is larger.
    tol = max(0.02 * PUBLISHED_PARAMS_M[name], 0.005)
    assert abs(params - PUBLISHED_PARAMS_M[name]) <= tol, f"{name}: {params:.4f}M"


def _resnet_macs(depth, widths, num_classes, hw=32, cin=3):
    """Multiply-adds of a CIFAR ResNet counted by hand from its definition."""
    n = (depth - 2) // 6
    macs = hw * hw * 9 * cin * widths[0]  # stem
    c = widths[0]
    for s, cout in enumerate(widths[1:]):
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            out_hw = hw // stride
            macs += out_hw * out_hw * 9 * c * cout + out_hw * out_hw * 9 * cout * cout
            if stride != 1 or c != cout:
                macs += out_hw * out_hw * c * cout  # 1x1 shortcut
            hw, c = out_hw, cout
    return macs + c * num_classes


@pytest.mark.parametrize(
    "name,depth,widths", [("resnet20", 20, (16, 16, 32, 64)), ("resnet8x4", 8, (32, 64, 128, 256))]
)
def test_flops_match_a_hand_count(name, depth, widths):
    m = create_model(name, num_classes=100, input_shape=CIFAR)
    assert model_stats(m, CIFAR).flops == 2 * _resnet_macs(depth, widths, 100)
    if name == "resnet20":  # the literature's "41M" multiply-adds for resnet20
        assert 40e6 < model_stats(m, CIFAR).flops / 2 < 42e6


def test_mlp_flops_and_params():
    m = create_model("mlp_2x1200", num_classes=10, input_shape=(28, 28, 1))
    st = model_stats(m, (28, 28, 1))
    macs = 784 * 1200 + 1200 * 1200 + 1200 * 10
    assert st.flops == 2 * macs and st.params == macs + 1200 + 1200 + 10


@pytest.mark.parametrize("name", ["mlp_100", "cnn", "resnet8", "wrn_16_1", "mobilenetv2"])
def test_forward_shapes_and_features(name):
    shape = (28, 28, 1) if name.startswith("mlp") or name == "cnn" else CIFAR
    m = create_model(name, num_classes=7, input_shape=shape)
    m.eval()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, *shape)), jnp.float32)
    g, state = nnx.split(m)
    # jitted: one compilation each instead of one per eager operation (mobilenetv2: 14 s -> 9 s)
    y = jax.jit(lambda st, x: nnx.merge(g, st)(x))(state, x)
    assert y.shape == (3, 7) and y.dtype == jnp.float32
    y2, feats = jax.jit(lambda st, x: call_with_features(nnx.merge(g, st), x))(state, x)
    assert feats, "no features recorded"
    for v in feats.values():
        assert v.shape[0] == 3
    np.testing.assert_allclose(y2, y, rtol=1e-6)  # recording features changes nothing


def test_resnet_features_are_nhwc_stage_maps():
    m = create_model("resnet8", num_classes=10, input_shape=CIFAR)
    m.eval()
    _, f = call_with_features(m, jnp.zeros((2, *CIFAR)))
    assert f["stage1"].shape == (2, 32, 32, 16)
    assert f["stage2"].shape == (2, 16, 16, 32)
    assert f["stage3"].shape == (2, 8, 8, 64)
    assert f["pooled"].shape == (2, 64)


def test_every_registered_name_builds():
    for name in MODELS:
        shape = (28, 28, 1) if name.startswith("mlp") else CIFAR
        # traced abstractly: every layer's construction runs, no weights are drawn
        model = nnx.eval_shape(lambda: create_model(name, num_classes=10, input_shape=shape))
        model.eval()
        graphdef, state = nnx.split(model)
        logits = jax.eval_shape(
            lambda st, x: nnx.merge(graphdef, st)(x), state, jax.ShapeDtypeStruct((2, *shape), jnp.float32)
        )
        assert logits.shape == (2, 10) and logits.dtype == jnp.float32, name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="resnet9"), "unknown model 'resnet9'"),
        (dict(name="resnet8", num_classes=1), "num_classes must be >= 2"),
        (dict(name="resnet8", input_shape=(32, 32)), r"input_shape must be \(H, W, C\)"),
        (dict(name="cnn", depth=3), "model 'cnn' takes no option 'depth'; its options: width"),
        (dict(name="mlp", hidden=64), r"model option hidden=64 for 'mlp': expected a tuple of positive integers"),
        (dict(name="mlp", dropout=1.5), r"model option dropout=1.5 for 'mlp': expected a number in \[0, 1\)"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    args = dict(num_classes=10, input_shape=CIFAR) | kwargs
    name = args.pop("name")
    with pytest.raises(ValueError, match=match):
        create_model(name, **args)


def test_features_under_jit_on_a_merged_model():
    from flax import nnx

    m = create_model("cnn", num_classes=10, input_shape=(28, 28, 1))
    graphdef, state = nnx.split(m)

    @jax.jit
    def f(state, x):
        model = nnx.merge(graphdef, state)
        model.eval()
        return call_with_features(model, x)

    logits, feats = f(state, jnp.ones((2, 28, 28, 1)))
    assert logits.shape == (2, 10) and feats["block2"].shape == (2, 7, 7, 64)
