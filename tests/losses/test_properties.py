"""Properties of the losses: zeros, limits, gradients, transforms, masks, stability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import losses as L
from tests.losses import reference as R

C = 10


def _pair(seed=0, shape=(8, C), scale=3.0):
    rng = np.random.default_rng(seed)
    s = jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    t = jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]), jnp.int32)
    return s, t, y


# Every loss as f(student, teacher, labels, where) -> [...], for the shared property tests.
LOSSES = {
    "soft": lambda s, t, y, w=None: L.soft_distillation_loss(s, t, temperature=4.0, where=w),
    "blended": lambda s, t, y, w=None: L.blended_soft_loss(s, t, temperature=2.0, where=w),
    "hard": lambda s, t, y, w=None: L.hard_distillation_loss(s, t, label_smoothing=0.1, where=w),
    "dkd": lambda s, t, y, w=None: L.decoupled_distillation_loss(s, t, y, where=w),
    "ce": lambda s, t, y, w=None: L.cross_entropy_loss(s, y, label_smoothing=0.1, where=w),
    "objective": lambda s, t, y, w=None: L.distillation_objective(
        s, y, L.soft_distillation_loss(s, t, temperature=4.0, where=w), kd_weight=0.9, ce_weight=0.1, where=w
    ),
    "topk": lambda s, t, y, w=None: L.topk_soft_distillation_loss(s, *L.teacher_topk(t, 3), temperature=2.0, where=w),
    "kl_metric": lambda s, t, y, w=None: L.teacher_student_kl(s, t, where=w),
    "hint": lambda s, t, y, w=None: L.hint_loss(s, t, where=w),
}
DIFFERENTIABLE = list(LOSSES)


# ---- values at known points ----------------------------------------------------------------


def test_zero_when_student_equals_teacher():
    s, _, y = _pair()
    for name in ("soft", "dkd", "kl_metric", "hint"):
        np.testing.assert_allclose(LOSSES[name](s, s, y), 0.0, atol=1e-6, err_msg=name)
    for alpha, beta in [(1.0, 0.0), (0.0, 1.0)]:  # each DKD part alone
        v = L.decoupled_distillation_loss(s, s, y, tckd_weight=alpha, nckd_weight=beta)
        np.testing.assert_allclose(v, 0.0, atol=1e-6)
    a = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 4, 5)), jnp.float32)
    np.testing.assert_allclose(L.attention_transfer_loss(a, a), 0.0, atol=1e-7)


def test_blended_at_equality_is_teacher_entropy_with_zero_gradient():
    # The blend's CE part is a cross-entropy, not a divergence: at s == t it equals the
    # teacher's entropy times (1 - w), and the student's gradient vanishes.
    s, _, _ = _pair()
    w, T = 0.3, 2.0
    val = L.blended_soft_loss(s, s, temperature=T, mse_weight=w)
    ent = [-(p * np.log(p)).sum() for p in (R.softmax(row, T) for row in np.asarray(s))]
    np.testing.assert_allclose(val, (1 - w) * np.array(ent), rtol=1e-5)
    g = jax.grad(lambda x: L.blended_soft_loss(x, s, temperature=T, mse_weight=w).sum())(s)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_temperature_one_with_one_hot_teacher_is_cross_entropy():
    s, _, y = _pair()
    one_hot_teacher = jnp.where(jax.nn.one_hot(y, C, dtype=jnp.bool_), 0.0, -jnp.inf)
    kd = L.soft_distillation_loss(s, one_hot_teacher, temperature=1.0)
    ref = [R.cross_entropy(row, label) for row, label in zip(np.asarray(s), np.asarray(y))]
    np.testing.assert_allclose(kd, ref, rtol=1e-5)
    np.testing.assert_allclose(kd, L.cross_entropy_loss(s, y), rtol=1e-6)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 30.0])
def test_soft_gradient_is_T_times_prob_difference(T):
    s, t, _ = _pair(2)
    g = jax.grad(lambda x: L.soft_distillation_loss(x, t, temperature=T).sum())(s)
    ref = np.stack([T * (R.softmax(a, T) - R.softmax(b, T)) for a, b in zip(np.asarray(s), np.asarray(t))])
    np.testing.assert_allclose(g, ref, atol=1e-5 * max(1.0, T))


def test_topk_with_all_classes_equals_soft():
    s, t, _ = _pair(3)
    vals, idx = L.teacher_topk(t, C)
    np.testing.assert_allclose(
        L.topk_soft_distillation_loss(s, vals, idx, temperature=3.0),
        L.soft_distillation_loss(s, t, temperature=3.0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_topk_accepts_bf16_storage():
    s, t, _ = _pair(4)
    vals, idx = L.teacher_topk(t, 5)
    out = L.topk_soft_distillation_loss(s, vals.astype(jnp.bfloat16), idx, temperature=2.0)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))


# ---- transforms ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_jit_equals_eager(name):
    s, t, y = _pair(5)
    f = LOSSES[name]
    np.testing.assert_allclose(jax.jit(f)(s, t, y), f(s, t, y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
def test_vmap_equals_batched(name):
    s, t, y = _pair(6, shape=(4, 8, C))
    batched = LOSSES[name](s, t, y)
    mapped = jax.vmap(LOSSES[name])(s, t, y)
    np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-7)


def test_vmap_over_temperatures_matches_separate_calls():
    # One student per temperature, as in a vmapped sweep.
    s, t, _ = _pair(7)
    temps = jnp.array([1.0, 2.0, 4.0, 8.0])
    out = jax.vmap(lambda T: L.soft_distillation_loss(s, t, temperature=T))(temps)
    for i, T in enumerate([1.0, 2.0, 4.0, 8.0]):
        np.testing.assert_allclose(out[i], L.soft_distillation_loss(s, t, temperature=T), rtol=1e-6)


def test_no_recompilation_on_second_call():
    s, t, y = _pair(8)
    f = jax.jit(lambda s, t, y: L.decoupled_distillation_loss(s, t, y).mean())
    f(s, t, y)
    f(s + 1.0, t, y)
    assert f._cache_size() == 1


# ---- masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_mask_equals_slicing_and_masked_gradient_is_zero(name):
    s, t, y = _pair(9, shape=(2, 6, C))
    where = jnp.array([[True, True, False, True, False, False], [True] * 6])
    # Poison the masked entries: nothing of them may leak into value or gradient.
    s = jnp.where(where[..., None], s, jnp.nan)
    t = jnp.where(where[..., None], t, jnp.inf)
    f = LOSSES[name]
    masked = f(s, t, y, where)
    assert np.all(np.asarray(masked)[~np.asarray(where)] == 0.0)
    sliced = f(s[where], t[where], y[where])
    np.testing.assert_allclose(np.asarray(masked)[np.asarray(where)], sliced, rtol=1e-6, atol=1e-7)
    g = jax.grad(lambda x: f(x, t, y, where).sum())(s)
    assert np.all(np.isfinite(g))
    assert np.all(np.asarray(g)[~np.asarray(where)] == 0.0)


def test_attention_mask():
    rng = np.random.default_rng(10)
    a, b = (jnp.asarray(rng.standard_normal((4, 3, 3, 2)), jnp.float32) for _ in range(2))
    where = jnp.array([True, False, True, False])
    out = L.attention_transfer_loss(a, b, where=where)
    np.testing.assert_allclose(out[jnp.array([0, 2])], L.attention_transfer_loss(a[::2], b[::2]), rtol=1e-6)
    g = jax.grad(lambda x: L.attention_transfer_loss(x, b, where=where).sum())(a)
    assert np.all(np.asarray(g)[1] == 0) and np.all(np.isfinite(g))


# ---- stability -----------------------------------------------------------------------------


def _finite_value_and_grad(f, s, *args):
    val, g = jax.value_and_grad(lambda x: f(x, *args).sum())(s)
    return bool(np.isfinite(val)) and bool(np.all(np.isfinite(g)))


@pytest.mark.parametrize("name", DIFFERENTIABLE)
@pytest.mark.parametrize("scale", [1e4])
def test_huge_logits_are_finite(name, scale):
    s, t, y = _pair(11, scale=scale)
    assert _finite_value_and_grad(LOSSES[name], s, t, y)


@pytest.mark.parametrize("name", [n for n in DIFFERENTIABLE if n != "hint"])
def test_minus_inf_in_padded_vocabulary(name):
    s, t, y = _pair(12)
    y = y % (C - 3)  # the last 3 classes do not exist
    pad = jnp.arange(C) >= C - 3
    s, t = jnp.where(pad, -jnp.inf, s), jnp.where(pad, -jnp.inf, t)
    assert _finite_value_and_grad(LOSSES[name], s, t, y)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(name, dtype):
    s, t, y = _pair(13)
    out = LOSSES[name](s.astype(dtype), t.astype(dtype), y)
    assert out.dtype == jnp.float32
    ref = LOSSES[name](s.astype(dtype).astype(jnp.float32), t.astype(dtype).astype(jnp.float32), y)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert _finite_value_and_grad(LOSSES[name], s.astype(dtype), t.astype(dtype), y)


@pytest.mark.parametrize("T", [0.05, 0.3, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_temperature_range_is_finite(T, scale):
    s, t, y = _pair(14, scale=scale)
    fs = [
        lambda x: L.soft_distillation_loss(x, t, temperature=T),
        lambda x: L.blended_soft_loss(x, t, temperature=T),
        lambda x: L.decoupled_distillation_loss(x, t, y, temperature=T),
        lambda x: L.topk_soft_distillation_loss(x, *L.teacher_topk(t, 4), temperature=T),
        lambda x: L.teacher_student_kl(x, t, temperature=T),
    ]
    for f in fs:
        assert _finite_value_and_grad(f, s)


def test_sequence_model_token_distillation_with_padding():
    # [batch, seq, vocab] logits with a padding mask, reduced to a mean over real tokens.
    s, t, _ = _pair(15, shape=(3, 7, 50))
    lengths = jnp.array([7, 4, 1])
    where = jnp.arange(7)[None, :] < lengths[:, None]
    per_token = L.soft_distillation_loss(s, t, temperature=2.0, where=where)
    mean = per_token.sum() / where.sum().astype(jnp.float32)
    ref = np.mean([R.soft_kd(s[b, i], t[b, i], 2.0) for b in range(3) for i in range(int(lengths[b]))])
    np.testing.assert_allclose(float(mean), ref, rtol=1e-5)


@pytest.mark.parametrize("shape,chunk", [((37, 50), 8), ((3, 7, 50), 4), ((5, 20), 64)])
def test_chunked_soft_loss_equals_plain_value_and_gradient(shape, chunk):
    s, t, _ = _pair(16, shape=shape)
    T = 3.0
    where = jnp.asarray(np.random.default_rng(1).random(shape[:-1]) > 0.3)
    plain = lambda x: L.soft_distillation_loss(x, t, temperature=T, where=where)  # noqa: E731
    chunked = lambda x: L.chunked_soft_distillation_loss(x, t, temperature=T, chunk_size=chunk, where=where)  # noqa: E731
    np.testing.assert_allclose(chunked(s), plain(s), rtol=1e-5, atol=1e-6)
    g_plain = jax.grad(lambda x: plain(x).sum())(s)
    g_chunked = jax.grad(lambda x: chunked(x).sum())(s)
    np.testing.assert_allclose(g_chunked, g_plain, rtol=1e-5, atol=1e-6)


def test_chunked_soft_loss_reference_and_bf16():
    s, t, _ = _pair(17, shape=(10, 30))
    ref = [R.soft_kd(a, b, 2.0) for a, b in zip(np.asarray(s), np.asarray(t))]
    np.testing.assert_allclose(L.chunked_soft_distillation_loss(s, t, temperature=2.0, chunk_size=4), ref, rtol=1e-5)
    out = L.chunked_soft_distillation_loss(
        s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), temperature=2.0, chunk_size=4
    )
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        L.chunked_soft_distillation_loss(s, t, chunk_size=0)


def test_chunked_soft_loss_teacher_gradient_matches_plain():
    s, t, _ = _pair(18, shape=(9, 40))
    g_plain = jax.grad(lambda y: L.soft_distillation_loss(s, y, temperature=2.0).sum())(t)
    g_chunked = jax.grad(lambda y: L.chunked_soft_distillation_loss(s, y, temperature=2.0, chunk_size=4).sum())(t)
    np.testing.assert_allclose(g_chunked, g_plain, rtol=1e-5, atol=1e-6)
    # -inf padded vocabulary stays finite in value and gradient.
    pad = jnp.arange(40) >= 35
    sp, tp = jnp.where(pad, -jnp.inf, s), jnp.where(pad, -jnp.inf, t)
    val, g = jax.value_and_grad(lambda x: L.chunked_soft_distillation_loss(x, tp, chunk_size=4).sum())(sp)
    assert np.isfinite(float(val)) and np.all(np.isfinite(g))
    np.testing.assert_allclose(val, L.soft_distillation_loss(sp, tp).sum(), rtol=1e-5)
