"""Each loss against an independent numpy float64 formula, on random inputs of several shapes."""

import jax.numpy as jnp
import numpy as np
import pytest

from jkd import losses as L
from tests.losses import reference as R

SHAPES = [(7,), (16, 10), (4, 6, 13), (2, 3, 5, 100)]


def _assert_close(got, ref):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape
    scale = max(np.max(np.abs(ref)), 1e-12)
    np.testing.assert_array_less(np.abs(got - ref), 1e-4 * scale + 1e-7)


def _logits(rng, shape, scale=3.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_soft_distillation(shape, temperature):
    rng = np.random.default_rng(0)
    s, t = _logits(rng, shape), _logits(rng, shape)
    got = L.soft_distillation_loss(s, t, temperature=temperature)
    ref = R.per_example(lambda a, b: R.soft_kd(a, b, temperature), s, t)
    _assert_close(got, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature,mse_weight", [(1.0, 0.5), (2.0, 0.0), (5.0, 1.0), (3.0, 0.3)])
def test_blended_soft(shape, temperature, mse_weight):
    rng = np.random.default_rng(1)
    s, t = _logits(rng, shape), _logits(rng, shape)
    got = L.blended_soft_loss(s, t, temperature=temperature, mse_weight=mse_weight)
    ref = R.per_example(lambda a, b: R.blended(a, b, temperature, mse_weight), s, t)
    _assert_close(got, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_hard_distillation(shape, eps):
    rng = np.random.default_rng(2)
    s, t = _logits(rng, shape), _logits(rng, shape)
    got = L.hard_distillation_loss(s, t, label_smoothing=eps)
    ref = R.per_example(lambda a, b: R.hard_kd(a, b, eps), s, t)
    _assert_close(got, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy(shape, eps):
    rng = np.random.default_rng(3)
    z = _logits(rng, shape)
    y = rng.integers(0, shape[-1], shape[:-1])
    got = L.cross_entropy_loss(z, y, label_smoothing=eps)
    ref = R.per_example(lambda a, b: R.cross_entropy(a, b[0], eps), z, y[..., None])
    _assert_close(got, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (1.0, 2.0, 1.0), (0.5, 1.0, 10.0)])
def test_decoupled_distillation(shape, alpha, beta, temperature):
    rng = np.random.default_rng(4)
    s, t = _logits(rng, shape), _logits(rng, shape)
    y = rng.integers(0, shape[-1], shape[:-1])
    got = L.decoupled_distillation_loss(s, t, y, tckd_weight=alpha, nckd_weight=beta, temperature=temperature)
    ref = R.per_example(lambda a, b, c: R.dkd(a, b, c[0], alpha, beta, temperature), s, t, y[..., None])
    _assert_close(got, ref)


def test_dkd_parts_recompose_kd():
    # DKD paper, eq. 7: KD = TCKD + (1 - p_t) * NCKD. With beta = 1 - p_t per example, DKD
    # (alpha = 1) must equal the soft KD loss.
    rng = np.random.default_rng(5)
    s, t = _logits(rng, (32, 10)), _logits(rng, (32, 10))
    y = rng.integers(0, 10, 32)
    T = 3.0
    beta = np.array([1 - R.softmax(t[i], T)[y[i]] for i in range(32)], np.float32)
    dkd = L.decoupled_distillation_loss(s, t, y, tckd_weight=1.0, nckd_weight=beta, temperature=T)
    kd = R.per_example(lambda a, b: R.soft_kd(a, b, T), s, t)
    _assert_close(dkd, kd)


@pytest.mark.parametrize("kd_weight,ce_weight", [(0.9, 0.1), (1.0, 1.0), (0.0, 1.0)])
def test_distillation_objective(kd_weight, ce_weight):
    rng = np.random.default_rng(6)
    s, t = _logits(rng, (8, 6, 10)), _logits(rng, (8, 6, 10))
    y = rng.integers(0, 10, (8, 6))
    kd = L.soft_distillation_loss(s, t, temperature=4.0)
    got = L.distillation_objective(s, y, kd, kd_weight=kd_weight, ce_weight=ce_weight)
    ref = R.per_example(
        lambda a, b, c: kd_weight * R.soft_kd(a, b, 4.0) + ce_weight * R.cross_entropy(a, c[0]),
        s,
        t,
        y[..., None],
    )
    _assert_close(got, ref)


@pytest.mark.parametrize("shape", [(5, 8), (3, 4, 16), (2, 6, 6, 3)])
def test_hint_loss(shape):
    rng = np.random.default_rng(7)
    u, v = _logits(rng, shape), _logits(rng, shape)
    n = len(shape) - 1
    got = L.hint_loss(u, v, num_feature_axes=n)
    lead = shape[:1]
    ref = np.array([R.hint(u[i], v[i]) for i in range(lead[0])])
    _assert_close(got, ref)


@pytest.mark.parametrize("shape_s,shape_t", [((4, 8, 8, 16), (4, 8, 8, 64)), ((2, 3, 5, 5, 4), (2, 3, 5, 5, 4))])
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_attention_transfer(shape_s, shape_t, p):
    rng = np.random.default_rng(8)
    a_s, a_t = _logits(rng, shape_s), _logits(rng, shape_t)
    got = L.attention_transfer_loss(a_s, a_t, p=p)
    lead = shape_s[:-3]
    ref = np.zeros(lead)
    for ix in np.ndindex(*lead):
        ref[ix] = R.attention_transfer(a_s[ix], a_t[ix], p)
    _assert_close(got, ref)


@pytest.mark.parametrize("k", [1, 5, 50, 100])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_topk_soft_distillation(k, temperature):
    rng = np.random.default_rng(9)
    s, t = _logits(rng, (6, 3, 100)), _logits(rng, (6, 3, 100))
    vals, idx = L.teacher_topk(t, k)
    order = np.argsort(-t, axis=-1)[..., :k]  # reference top-k, independent of lax.top_k
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(order, -1))
    got = L.topk_soft_distillation_loss(s, vals, idx, temperature=temperature)
    ref = R.per_example(lambda a, b, i: R.topk_soft_kd(a, b[i], i, temperature), s, t, order)
    _assert_close(got, ref)


def test_metrics():
    rng = np.random.default_rng(10)
    s, t = _logits(rng, (50, 4)), _logits(rng, (50, 4))
    agree = np.asarray(L.top1_agreement(s, t))
    np.testing.assert_array_equal(agree, (np.argmax(s, -1) == np.argmax(t, -1)).astype(np.float32))
    ref_kl = R.per_example(lambda a, b: R.kl(R.softmax(b, 2.0), R.softmax(a, 2.0)), s, t)
    _assert_close(L.teacher_student_kl(s, t, temperature=2.0), ref_kl)


# ---- hand-worked small cases -------------------------------------------------------------


def test_soft_hand_worked():
    # Teacher [ln 3, 0] -> p = [3/4, 1/4]; student [0, 0] -> q = [1/2, 1/2]; T = 1.
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.75*0.405465 - 0.25*0.693147 = 0.130812.
    got = L.soft_distillation_loss(jnp.array([0.0, 0.0]), jnp.array([np.log(3.0), 0.0]))
    np.testing.assert_allclose(float(got), 0.75 * np.log(1.5) + 0.25 * np.log(0.5), rtol=1e-6)
    # The same logits doubled at T = 2 give the same distributions: loss = 4 * 0.130812.
    got2 = L.soft_distillation_loss(jnp.array([0.0, 0.0]), jnp.array([2 * np.log(3.0), 0.0]), temperature=2.0)
    np.testing.assert_allclose(float(got2), 4 * float(got), rtol=1e-6)


def test_hard_hand_worked():
    # Teacher picks class 2; student uniform over 4 classes: CE = ln 4.
    got = L.hard_distillation_loss(jnp.zeros(4), jnp.array([0.0, 1.0, 5.0, 2.0]))
    np.testing.assert_allclose(float(got), np.log(4.0), rtol=1e-6)


def test_dkd_hand_worked():
    # 3 classes, label 0, T = 1. Student uniform: b_s = [1/3, 2/3], p_hat_s = [1/2, 1/2].
    # Teacher [ln 2, ln 1, ln 1] -> p = [1/2, 1/4, 1/4]: b_t = [1/2, 1/2], p_hat_t = [1/2, 1/2].
    # TCKD = 1/2 ln(3/2) + 1/2 ln(3/4); NCKD = 0.
    got = L.decoupled_distillation_loss(
        jnp.zeros(3),
        jnp.array([np.log(2.0), 0.0, 0.0]),
        jnp.array(0),
        tckd_weight=1.0,
        nckd_weight=8.0,
        temperature=1.0,
    )
    np.testing.assert_allclose(float(got), 0.5 * np.log(1.5) + 0.5 * np.log(0.75), rtol=1e-5)


def test_blended_hand_worked():
    # p = [3/4, 1/4], q = [1/2, 1/2], w = 0.5: 0.5*(1/16 + 1/16) + 0.5*(ln 2).
    got = L.blended_soft_loss(jnp.zeros(2), jnp.array([np.log(3.0), 0.0]), mse_weight=0.5)
    np.testing.assert_allclose(float(got), 0.5 * 0.125 + 0.5 * np.log(2.0), rtol=1e-6)
