"""Token-level divergences against float64 numpy formulas written from the papers; limits of
beta and alpha; NaN safety; masks; the token mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import losses
from jkd.losses import (
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
    token_divergence,
    token_mean,
)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _kl(log_a, log_b):
    """sum a (log a - log b) with 0 log 0 = 0 (numpy, float64, from log-probabilities)."""
    a = np.exp(log_a)
    with np.errstate(invalid="ignore"):
        return np.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def reference(name, s, t, T=1.0, beta=0.5, alpha=0.1):
    """The papers' definitions: p = teacher, q = student.

    GKD (Agarwal et al. 2024, eq. 4 with TRL's mixture): beta KL(p||m) + (1-beta) KL(q||m),
    m = beta p + (1-beta) q. DistiLLM (Ko et al. 2024, eq. 3-4): KL(p || a p + (1-a) q) and
    KL(q || (1-a) p + a q). Total variation: half the L1 distance.
    """
    lp, lq = _log_softmax(np.asarray(t, np.float64) / T), _log_softmax(np.asarray(s, np.float64) / T)
    p, q = np.exp(lp), np.exp(lq)
    log = lambda x: np.log(np.where(x > 0, x, 1.0))  # noqa: E731  (entries with x = 0 are never weighted)
    if name == "forward":
        return _kl(lp, lq)
    if name == "reverse":
        return _kl(lq, lp)
    if name == "jsd":
        lm = log(beta * p + (1 - beta) * q)
        return beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)
    if name == "skew_forward":
        return _kl(lp, log(alpha * p + (1 - alpha) * q))
    if name == "skew_reverse":
        return _kl(lq, log((1 - alpha) * p + alpha * q))
    if name == "tv":
        return 0.5 * np.abs(p - q).sum(-1)
    raise ValueError(name)


CASES = [
    ("forward", ForwardKL()),
    ("reverse", ReverseKL()),
    ("jsd", GeneralizedJSD(beta=0.5)),
    ("skew_forward", SkewForwardKL(alpha=0.1)),
    ("skew_reverse", SkewReverseKL(alpha=0.1)),
    ("tv", TotalVariation()),
]


def _logits(seed, shape=(3, 4, 17), scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale).astype(np.float32), (rng.normal(size=shape) * scale).astype(np.float32)


@pytest.mark.parametrize("name, div", CASES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_against_float64_reference(name, div, T):
    s, t = _logits(0)
    got = np.asarray(token_divergence(jnp.asarray(s), jnp.asarray(t), divergence=div, temperature=T))
    np.testing.assert_allclose(got, reference(name, s, t, T), rtol=2e-5, atol=2e-6)
    assert got.shape == (3, 4) and (got >= -1e-6).all()


@pytest.mark.parametrize("beta", [0.1, 0.9, 0.37])
def test_jsd_other_betas(beta):
    s, t = _logits(1)
    got = token_divergence(jnp.asarray(s), jnp.asarray(t), divergence=GeneralizedJSD(beta=beta))
    np.testing.assert_allclose(np.asarray(got), reference("jsd", s, t, beta=beta), rtol=2e-5, atol=2e-6)


def test_jsd_limits_are_forward_and_reverse_kl():
    """beta = 0 / 1 are the scaled limits: JSD_beta / beta -> KL(p||q), JSD_beta / (1-beta) -> KL(q||p)."""
    s, t = _logits(2, scale=1.0)
    fwd, rev = reference("forward", s, t), reference("reverse", s, t)
    at0 = np.asarray(token_divergence(s, t, divergence=GeneralizedJSD(beta=0.0)))
    at1 = np.asarray(token_divergence(s, t, divergence=GeneralizedJSD(beta=1.0)))
    np.testing.assert_allclose(at0, fwd, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(at1, rev, rtol=2e-5, atol=1e-6)
    eps = 1e-4  # the float64 formula approaches the limits continuously
    np.testing.assert_allclose(reference("jsd", s, t, beta=eps) / eps, fwd, rtol=2e-3)
    np.testing.assert_allclose(reference("jsd", s, t, beta=1 - eps) / eps, rev, rtol=2e-3)


def test_skew_limits():
    s, t = _logits(3)
    for div, at0 in ((SkewForwardKL, "forward"), (SkewReverseKL, "reverse")):
        np.testing.assert_allclose(
            np.asarray(token_divergence(s, t, divergence=div(alpha=0.0))), reference(at0, s, t), rtol=2e-5, atol=1e-6
        )
        np.testing.assert_allclose(np.asarray(token_divergence(s, t, divergence=div(alpha=1.0))), 0.0, atol=1e-6)


@pytest.mark.parametrize("name, div", CASES)
def test_padded_vocabulary_and_masked_tokens_are_safe(name, div):
    """-inf in padded vocabulary entries (both models), a fully masked sequence, NaN/inf in
    masked tokens: finite values and gradients; masked tokens get exactly zero gradient."""
    s, t = _logits(4, shape=(2, 3, 12))
    s[..., 9:] = -np.inf
    t[..., 9:] = -np.inf  # three padded vocabulary rows
    t[0, 0, 0] = -1e4  # a zero-probability entry under p (reverse KL's weak spot)
    where = np.array([[True, True, False], [False, False, False]])
    s[0, 2] = np.nan
    t[0, 2] = np.inf
    s[1] = np.inf  # the fully masked sequence is garbage

    def f(s_, t_):
        return jnp.sum(token_divergence(s_, t_, divergence=div, where=jnp.asarray(where)))

    value = f(jnp.asarray(s), jnp.asarray(t))
    gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    assert np.isfinite(float(value))
    assert np.isfinite(np.asarray(gs)).all() and np.isfinite(np.asarray(gt)).all()
    assert (np.asarray(gs)[~where] == 0).all() and (np.asarray(gt)[~where] == 0).all()
    assert (np.asarray(gs)[..., 9:] == 0).all()
    expected = reference(name, s[0, :2, :9], t[0, :2, :9]).sum()
    np.testing.assert_allclose(float(value), expected, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("name, div", CASES)
def test_gradients_numerically(name, div):
    """The divergences use plain autodiff; check it against finite differences anyway (float64),
    away from TV's kinks."""
    from jax.test_util import check_grads

    s, t = _logits(5, shape=(2, 7), scale=1.0)
    with jax.enable_x64():
        f = lambda a, b: token_divergence(a, b, divergence=div, temperature=1.5)  # noqa: E731
        check_grads(
            f, (jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)), order=1, modes=["rev"], atol=1e-5, rtol=1e-5
        )


def test_token_mean_counts_tokens_not_sequences():
    values = jnp.array([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    where = jnp.array([[True, True, True, True], [True, False, False, False]])
    assert float(token_mean(values, where)) == pytest.approx(9.0 / 5)  # not (1 + 5) / 2
    assert float(token_mean(values, where, num_tokens=10)) == pytest.approx(0.9)
    assert float(token_mean(values, jnp.zeros_like(where))) == 0.0  # never 0 / 0


def test_bad_arguments():
    s, t = _logits(6)
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\]"):
        GeneralizedJSD(beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        SkewForwardKL(alpha=-0.1)
    with pytest.raises(TypeError, match="divergence must be one of"):
        token_divergence(s, t, divergence="forward_kl")
    with pytest.raises(ValueError, match="same shape"):
        token_divergence(s, t[..., :5])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_divergence(s, t, temperature=0.0)


def test_exported():
    for name in ("token_divergence", "token_mean", "ForwardKL", "GeneralizedJSD"):
        assert hasattr(losses, name)


def _hidden(seed, rows=(3, 5)):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(*rows, 8)).astype(np.float32),
        rng.normal(size=(40, 8)).astype(np.float32),
        rng.normal(size=(*rows, 6)).astype(np.float32),
        rng.normal(size=(40, 6)).astype(np.float32),
    )


@pytest.mark.parametrize("name, div", CASES)
def test_projected_against_float64_reference(name, div):
    hs, ws, ht, wt = _hidden(7)
    where = (np.arange(15).reshape(3, 5) % 4) != 0
    hs[~where] = np.nan  # what masked rows hold must not matter
    got = losses.projected_token_divergence(hs, ws, ht, wt, divergence=div, temperature=2.0, where=where, chunk_size=4)
    s = np.asarray(hs, np.float64) @ ws.T.astype(np.float64)
    t = np.asarray(ht, np.float64) @ wt.T.astype(np.float64)
    want = reference(name, s[where], t[where], T=2.0).sum() / where.sum()
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    halved = losses.projected_token_divergence(
        hs, ws, ht, wt, divergence=div, temperature=2.0, where=where, chunk_size=4, num_tokens=2 * int(where.sum())
    )
    np.testing.assert_allclose(float(halved), want / 2, rtol=2e-5)


@pytest.mark.parametrize(
    "div",
    [ForwardKL(), ReverseKL(), GeneralizedJSD(beta=0.3), SkewForwardKL(alpha=0.2)],
    ids=lambda d: type(d).__name__,
)
def test_projected_custom_gradient_numerically(div):
    """The fused loss's custom VJP against finite differences (float64), teacher frozen."""
    from jax.test_util import check_grads

    hs, ws, ht, wt = _hidden(8, rows=(2, 3))
    where = np.array([[True, False, True], [True, True, False]])
    with jax.enable_x64():
        args = [jnp.asarray(x, jnp.float64) for x in (hs, ws)]
        f = lambda a, b: losses.projected_token_divergence(  # noqa: E731
            a,
            b,
            jnp.asarray(ht, jnp.float64),
            jnp.asarray(wt, jnp.float64),
            divergence=div,
            temperature=1.5,
            where=jnp.asarray(where),
            chunk_size=4,
        )
        check_grads(f, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
        gt = jax.grad(
            lambda c_: losses.projected_token_divergence(
                args[0], args[1], c_, jnp.asarray(wt, jnp.float64), divergence=div, chunk_size=4
            )
        )(jnp.asarray(ht, jnp.float64))
        assert (np.asarray(gt) == 0).all()  # the teacher is frozen


def test_projected_with_labels_mixes_in_the_cross_entropy():
    hs, ws, ht, wt = _hidden(9)
    labels = np.random.default_rng(9).integers(0, 40, (3, 5))
    where = np.ones((3, 5), bool)
    where[2, 3:] = False
    got = losses.projected_token_divergence(
        hs,
        ws,
        ht,
        wt,
        divergence=ReverseKL(),
        temperature=2.0,
        where=where,
        labels=labels,
        divergence_weight=0.7,
        label_weight=0.3,
        chunk_size=4,
    )
    s = np.asarray(hs, np.float64) @ ws.T.astype(np.float64)
    t = np.asarray(ht, np.float64) @ wt.T.astype(np.float64)
    ce = -np.take_along_axis(_log_softmax(s), labels[..., None], -1)[..., 0]  # temperature 1
    want = (0.7 * reference("reverse", s, t, T=2.0) + 0.3 * ce)[where].sum() / where.sum()
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    from jax.test_util import check_grads

    with jax.enable_x64():
        f = lambda a, b: losses.projected_token_divergence(  # noqa: E731
            a,
            b,
            jnp.asarray(ht, jnp.float64),
            jnp.asarray(wt, jnp.float64),
            divergence=ReverseKL(),
            temperature=2.0,
            where=jnp.asarray(where),
            labels=jnp.asarray(labels),
            divergence_weight=0.7,
            label_weight=0.3,
            chunk_size=4,
        )
        check_grads(
            f,
            [jnp.asarray(hs, jnp.float64), jnp.asarray(ws, jnp.float64)],
            order=1,
            modes=["rev"],
            atol=1e-6,
            rtol=1e-6,
        )


@pytest.mark.parametrize("chunk_size", [1, 4, 9, 36, 1000])
def test_projected_with_ragged_masks_against_float64_value_and_gradient(chunk_size):
    """Sequences whose counted tokens start and end anywhere (one has none), cut into chunks of
    every size: the value and both gradients against the hand-written float64 forward-KL + CE
    formula, ``dL/ds = [w_D (q_T - p_T) / T + w_y (q - onehot(y))] / N`` on counted tokens."""
    rng = np.random.default_rng(21)
    hs, ws, ht, wt = _hidden(21, rows=(4, 9))
    starts, ends = np.array([0, 3, 6, 9]), np.array([9, 5, 9, 9])
    pos = np.arange(9)
    where = (pos >= starts[:, None]) & (pos < ends[:, None])  # row 3 counts nothing
    where[0, 4] = False  # and a hole
    labels = rng.integers(0, 40, (4, 9))
    hs[~where] = np.nan
    T, w_d, w_y = 2.0, 0.6, 0.4
    f = lambda a, b: losses.projected_token_divergence(  # noqa: E731
        a,
        b,
        ht,
        wt,
        divergence=ForwardKL(),
        temperature=T,
        where=where,
        labels=labels,
        divergence_weight=w_d,
        label_weight=w_y,
        chunk_size=chunk_size,
    )
    value, (dh, dw) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(hs), jnp.asarray(ws))
    h64 = np.where(where[..., None], hs, 0.0).astype(np.float64)
    s = h64 @ ws.T.astype(np.float64)
    t = np.asarray(ht, np.float64) @ wt.T.astype(np.float64)
    n = where.sum()
    ce = -np.take_along_axis(_log_softmax(s), labels[..., None], -1)[..., 0]
    want = ((w_d * reference("forward", s, t, T=T) + w_y * ce) * where).sum() / n
    np.testing.assert_allclose(float(value), want, rtol=2e-5)
    onehot = np.eye(40)[labels]
    ds = (
        (
            w_d * (np.exp(_log_softmax(s / T)) - np.exp(_log_softmax(t / T))) / T
            + w_y * (np.exp(_log_softmax(s)) - onehot)
        )
        * where[..., None]
        / n
    )
    np.testing.assert_allclose(np.asarray(dh), ds @ ws.astype(np.float64), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("btv,btd->vd", ds, h64), rtol=1e-4, atol=1e-7)
    assert not np.asarray(dh)[~where].any()  # masked tokens: exactly zero gradient


def test_projected_skips_chunks_without_counted_tokens():
    """Each chunk's products sit behind a ``lax.cond`` on "does this chunk count a token", and the
    counted positions are sorted to the front of each row, so a masked prompt costs no products."""
    hs, ws, ht, wt = _hidden(22, rows=(2, 8))
    where = np.arange(8)[None] >= np.array([[6], [2]])
    jaxpr = jax.make_jaxpr(lambda a: losses.projected_token_divergence(a, ws, ht, wt, where=where, chunk_size=4))(
        jnp.asarray(hs)
    )
    assert "cond[" in str(jaxpr)
    # the layout alone: rows sorted, counted first; a chunk of 2 positions x 2 rows
    from jkd.losses._token import _ChunkLayout

    layout = _ChunkLayout.of((2, 8), 4, jnp.asarray(where))
    chunks = np.asarray(layout.prep(jnp.asarray(where), False))
    assert chunks.shape == (4, 2, 2)
    np.testing.assert_array_equal(chunks.any(axis=(1, 2)), [True, True, True, False])
    pos = np.asarray(layout.prep(jnp.broadcast_to(jnp.arange(8), (2, 8))))
    np.testing.assert_array_equal(pos[0], [[6, 7], [2, 3]])  # each row's counted positions, in order


def test_projected_topk_against_float64_reference():
    hs, ws, ht, wt = _hidden(10)
    t = np.asarray(ht, np.float64) @ wt.T.astype(np.float64)
    lp_full = _log_softmax(t)
    k = 5
    ids = np.argsort(-lp_full, axis=-1)[..., :k]
    vals = np.take_along_axis(lp_full, ids, -1).astype(np.float32)
    where = np.ones((3, 5), bool)
    where[1, :2] = False
    T = 1.5
    got = losses.projected_topk_kl(
        hs, ws, jnp.asarray(vals, jnp.bfloat16).astype(jnp.float32), ids, temperature=T, where=where, chunk_size=4
    )
    # reference: p~ = softmax(vals / T) over the k ids, q = softmax(s / T) over the vocabulary
    vals_b = np.asarray(jnp.asarray(vals, jnp.bfloat16).astype(jnp.float32), np.float64)
    lp = _log_softmax(vals_b / T)
    lq = _log_softmax(np.asarray(hs, np.float64) @ ws.T.astype(np.float64) / T)
    kl = (np.exp(lp) * (lp - np.take_along_axis(lq, ids, -1))).sum(-1)
    np.testing.assert_allclose(float(got), kl[where].mean(), rtol=2e-5)


def test_projected_topk_with_the_whole_vocabulary_is_the_forward_kl():
    hs, ws, ht, wt = _hidden(11)
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(ht) @ jnp.asarray(wt).T, axis=-1))
    ids = np.tile(np.arange(40), (3, 5, 1))
    full = losses.projected_topk_kl(hs, ws, lp, ids, temperature=2.0, chunk_size=4)
    dense = losses.projected_token_divergence(hs, ws, ht, wt, divergence=ForwardKL(), temperature=2.0, chunk_size=4)
    np.testing.assert_allclose(float(full), float(dense), rtol=1e-5)
    from jax.test_util import check_grads

    with jax.enable_x64():
        f = (
            lambda a, b: losses.projected_topk_kl(  # noqa: E731
                a,
                b,
                jnp.asarray(lp[..., :7], jnp.float64),
                jnp.asarray(ids[..., :7]),
                temperature=2.0,
                labels=jnp.asarray(ids[..., 3]),
                label_weight=0.5,
                chunk_size=4,
            )
        )
        check_grads(
            f,
            [jnp.asarray(hs, jnp.float64), jnp.asarray(ws, jnp.float64)],
            order=1,
            modes=["rev"],
            atol=1e-6,
            rtol=1e-6,
        )
    with pytest.raises(ValueError, match=r"must lie in \[0, 39\]"):
        losses.projected_topk_kl(hs, ws, lp[..., :3], ids[..., :3] + 38)


def test_projected_in_bfloat16_stays_close_to_float32():
    """bfloat16 inputs: products in bfloat16 with float32 accumulation, softmax in float32."""
    hs, ws, ht, wt = _hidden(12)
    f32 = losses.projected_token_divergence(hs, ws, ht, wt, divergence=GeneralizedJSD(beta=0.5), chunk_size=4)
    args = [jnp.asarray(x, jnp.bfloat16) for x in (hs, ws, ht, wt)]
    bf16 = losses.projected_token_divergence(*args, divergence=GeneralizedJSD(beta=0.5), chunk_size=4)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(float(bf16), float(f32), rtol=3e-2)
    g = jax.grad(lambda a, b: losses.projected_token_divergence(a, b, args[2], args[3], chunk_size=4), (0, 1))(
        *args[:2]
    )
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in g)
