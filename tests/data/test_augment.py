"""Augmentations against direct numpy constructions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd.data import augment as A


def _images(b=16, h=6, w=5, c=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (b, h, w, c)), jnp.uint8)


def test_normalize_matches_formula():
    x = _images(c=3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    ref = (np.asarray(x, np.float64) / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(A.normalize(x, mean, std), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one value per channel"):
        A.normalize(x, (0.1,), (0.2,))


def test_random_crop_is_a_window_of_the_padded_image():
    x = _images()
    out = np.asarray(A.random_crop(jax.random.key(0), x, padding=2))
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(padded[i, dy : dy + 6, dx : dx + 5], out[i])
        ]
        assert hits, f"image {i} is not a crop of its padded original"
        offsets.add(hits[0])
    assert len(offsets) > 1  # offsets really vary
    np.testing.assert_array_equal(A.random_crop(jax.random.key(0), x, padding=0), x)


def test_random_flip_mirrors_about_half():
    x = _images(b=64)
    out = np.asarray(A.random_flip(jax.random.key(1), x))
    flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, x)]
    same = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 16 < sum(flipped) < 48


def test_mix_with_next_pairs_each_example_with_the_next_on_one_segment():
    x = np.random.default_rng(1).normal(size=(8, 5, 5, 1))
    keys = A.example_keys(jax.random.key(2), 8)
    mixed = np.asarray(A.mix_with_next(keys, jnp.asarray(x, jnp.float32), alpha=0.4), np.float64)
    nxt = np.roll(x, -1, axis=0)  # the last example's partner is the first
    lams = []
    for m, a, b in zip(mixed, x, nxt):  # m = lam a + (1 - lam) b for one lam in [0, 1]
        d = (a - b).ravel()
        lam = float(np.dot(m.ravel() - b.ravel(), d) / np.dot(d, d))
        np.testing.assert_allclose(m, lam * a + (1 - lam) * b, atol=1e-5)
        assert 0.0 <= lam <= 1.0
        lams.append(lam)
    assert np.std(lams) > 0.05  # one lam per example, not one per batch
    with pytest.raises(ValueError, match="alpha must be > 0"):
        A.mix_with_next(keys, jnp.asarray(x, jnp.float32), alpha=0.0)


def test_mixup_view_is_the_same_whatever_the_batch_is_jitted_on():
    x = _images(c=1)
    f = lambda k, im: A.augment(k, im, mean=(0.5,), std=(0.25,), crop_padding=2, mixup_alpha=1.0)  # noqa: E731
    plain = A.augment(jax.random.key(3), x, mean=(0.5,), std=(0.25,), crop_padding=2)
    a, b = jax.jit(f)(jax.random.key(3), x), f(jax.random.key(3), x)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, plain)  # mixing changed the views


def test_augment_same_key_same_view_and_jits():
    x = _images(c=1)
    f = jax.jit(lambda k, im: A.augment(k, im, mean=(0.5,), std=(0.25,), crop_padding=2, flip=True))
    a, b = f(jax.random.key(3), x), f(jax.random.key(3), x)
    np.testing.assert_array_equal(a, b)  # one key -> one view, whoever consumes it
    assert a.dtype == jnp.float32 and a.shape == x.shape


def test_views_do_not_depend_on_how_the_batch_is_split():
    """Example i draws from fold_in(key, i): a batch augmented whole equals its shards
    augmented with their global positions (what pmap's devices do)."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (8, 6, 6, 3)), jnp.uint8)
    key = jax.random.key(5)
    view = lambda keys, im: A.augment(keys, im, mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=2, flip=True)  # noqa: E731
    whole = view(A.example_keys(key, 8), x)
    shards = [view(A.example_keys(key, 2, first), x[first : first + 2]) for first in (0, 2, 4, 6)]
    np.testing.assert_array_equal(np.asarray(whole), np.concatenate([np.asarray(v) for v in shards]))
    np.testing.assert_array_equal(np.asarray(view(key, x)), np.asarray(whole))  # one key = positions 0..B-1
    assert not np.array_equal(np.asarray(whole[0]), np.asarray(view(A.example_keys(key, 1, 3), x[:1])[0]))
