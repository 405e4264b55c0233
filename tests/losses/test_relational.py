"""Relational and contrastive losses against float64 loops written from the papers."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import losses as L

B = 6


def _feats(seed, b=B, d=5):
    return np.random.default_rng(seed).normal(size=(b, d))


def _huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_rkd_distance(s, t):
    """Park et al. eq. 3-4: pairs of distinct examples, distances over their mean, Huber."""
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu = {name: np.mean([np.linalg.norm(x[i] - x[j]) for i, j in pairs]) for name, x in (("s", s), ("t", t))}
    out = np.zeros(n)
    for i, j in pairs:
        out[i] += _huber(np.linalg.norm(s[i] - s[j]) / mu["s"] - np.linalg.norm(t[i] - t[j]) / mu["t"])
    return out / (n - 1)


def ref_rkd_angle(s, t):
    """Park et al. eq. 5-6: the cosine of the angle at vertex i of every triplet (j, i, k)."""
    n = len(s)

    def cos(x, i, j, k):
        a, b = x[j] - x[i], x[k] - x[i]
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    out = np.zeros(n)
    for i, j, k in itertools.permutations(range(n), 3):
        out[i] += _huber(cos(s, i, j, k) - cos(t, i, j, k))
    return out / ((n - 1) * (n - 2))


def ref_sp(s, t):
    """Tung & Mori eq. 2-4: row-normalised Gram matrices, squared Frobenius over b^2."""

    def g(x):
        x = x.reshape(len(x), -1)
        gram = x @ x.T
        return gram / np.linalg.norm(gram, axis=1, keepdims=True)

    n = len(s)
    return np.sum((g(s) - g(t)) ** 2, axis=1) / n


def ref_crd(s, t, mem_s, mem_t, tau):
    """InfoNCE with the batch's other examples and the memory as negatives, both directions."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    s, t, mem_s, mem_t = unit(s), unit(t), unit(mem_s), unit(mem_t)
    out = np.zeros(len(s))
    for i in range(len(s)):
        for anchor, batch, mem in ((s[i], t, mem_t), (t[i], s, mem_s)):
            cands = np.concatenate([batch, mem])
            logits = cands @ anchor / tau
            out[i] += 0.5 * (np.log(np.sum(np.exp(logits))) - logits[i])
    return out


def test_rkd_distance_and_angle_match_the_paper():
    s, t = _feats(0), _feats(1, d=9)  # widths may differ
    np.testing.assert_allclose(
        L.rkd_distance_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)),
        ref_rkd_distance(s, t),
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        L.rkd_angle_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)),
        ref_rkd_angle(s, t),
        rtol=1e-4,
        atol=1e-6,
    )
    # Scaled features keep their relations: the losses vanish.
    assert np.max(np.asarray(L.rkd_distance_loss(jnp.asarray(3 * t), jnp.asarray(t)))) < 1e-6
    assert np.max(np.asarray(L.rkd_angle_loss(jnp.asarray(3 * t + 1), jnp.asarray(t)))) < 1e-6


def test_similarity_preserving_matches_the_paper_for_maps_of_any_shape():
    s, t = np.random.default_rng(2).normal(size=(B, 3, 3, 2)), _feats(3, d=7)
    np.testing.assert_allclose(
        L.similarity_preserving_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)),
        ref_sp(s, t),
        rtol=1e-4,
        atol=1e-7,
    )


def test_crd_matches_infonce_with_memory_negatives():
    s, t = _feats(4, d=8), _feats(5, d=8)
    ms, mt = _feats(6, b=10, d=8), _feats(7, b=10, d=8)
    got = L.contrastive_representation_loss(
        *(jnp.asarray(x, jnp.float32) for x in (s, t)),
        student_memory=jnp.asarray(ms, jnp.float32),
        teacher_memory=jnp.asarray(mt, jnp.float32),
        temperature=0.5,
    )
    np.testing.assert_allclose(got, ref_crd(s, t, ms, mt, 0.5), rtol=1e-4)
    # Unfilled memory rows are no negatives: half the memory marked empty equals passing half.
    valid = np.arange(10) < 5
    half = L.contrastive_representation_loss(
        jnp.asarray(s),
        jnp.asarray(t),
        student_memory=jnp.asarray(ms),
        teacher_memory=jnp.asarray(mt),
        memory_valid=jnp.asarray(valid),
        temperature=0.5,
    )
    np.testing.assert_allclose(half, ref_crd(s, t, ms[:5], mt[:5], 0.5), rtol=1e-4)


def test_standardize_logits_is_the_z_score_with_sample_std():
    z = np.random.default_rng(8).normal(size=(4, 10)) * 5 + 3
    want = (z - z.mean(1, keepdims=True)) / (1e-7 + z.std(1, ddof=1, keepdims=True))
    np.testing.assert_allclose(L.standardize_logits(jnp.asarray(z, jnp.float32)), want, rtol=1e-5, atol=1e-5)
    # Shift and scale of a model's logits no longer matter to the KD term.
    a = L.soft_distillation_loss(
        L.standardize_logits(jnp.asarray(z)), L.standardize_logits(jnp.asarray(2 * z + 7)), temperature=2.0
    )
    assert float(jnp.max(jnp.abs(a))) < 1e-5
    g = jax.grad(lambda x: jnp.sum(L.standardize_logits(x)))(jnp.ones((2, 5)))  # constant logits: finite
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize(
    "loss",
    [L.rkd_distance_loss, L.rkd_angle_loss, L.similarity_preserving_loss, L.contrastive_representation_loss],
    ids=lambda f: f.__name__,
)
def test_masked_examples_leave_every_relation(loss):
    """A masked row is neither an anchor nor a partner: the rest equals the sub-batch alone,
    even with NaN garbage in the masked row, and the garbage gets exactly zero gradient."""
    s, t = _feats(9, b=7, d=4), _feats(10, b=7, d=4)
    s[3], t[3] = np.nan, np.nan
    where = np.arange(7) != 3
    sj, tj = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    got = np.asarray(loss(sj, tj, where=jnp.asarray(where)))
    alone = np.asarray(loss(sj[where], tj[where]))
    assert got[3] == 0.0
    np.testing.assert_allclose(got[where], alone, rtol=1e-5, atol=1e-7)
    g = jax.grad(lambda x: jnp.sum(loss(x, tj, where=jnp.asarray(where))))(sj)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[3] == 0)


def test_relational_losses_are_finite_for_duplicated_examples():
    """Equal rows give zero distances: the safe square root keeps values and gradients finite."""
    s = jnp.asarray(np.repeat(_feats(11, b=3), 2, axis=0), jnp.float32)
    t = jnp.asarray(_feats(12), jnp.float32)
    for loss in (L.rkd_distance_loss, L.rkd_angle_loss):
        g = jax.grad(lambda x: jnp.sum(loss(x, t)))(s)  # noqa: B023
        assert np.all(np.isfinite(np.asarray(g))), loss.__name__


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one batch size"):
        L.rkd_distance_loss(jnp.zeros((4, 3)), jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match="one shape"):
        L.contrastive_representation_loss(jnp.zeros((4, 3)), jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="both student_memory and teacher_memory"):
        L.contrastive_representation_loss(jnp.zeros((4, 3)), jnp.zeros((4, 3)), student_memory=jnp.zeros((8, 3)))
