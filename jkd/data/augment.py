"""Augmentation in JAX, applied once per batch on the device: one view for teacher and student.

Call :func:`augment` inside the jitted train step and feed its output to *both* models
(big_vision's "consistent teaching"). All functions are pure: a key in, a batch out.

**One random stream whatever the device count.** Every random choice is made per example from
that example's own key. ``key`` is either one key (example ``i`` then draws from
``fold_in(key, i)``) or a batch of keys ``[B]``, one per example. The train steps pass
``fold_in(fold_in(rng, step), global_position)`` for each example, so one device, a mesh and
``pmap`` over any number of devices draw exactly the same views.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """uint8 ``[..., H, W, C]`` -> float32 ``(x / 255 - mean) / std``, per channel."""
    if images.shape[-1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"mean/std need one value per channel ({images.shape[-1]}); got {len(mean)} and {len(std)}.")
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def example_keys(key: jax.Array, batch_size: int, first_index: jax.Array | int = 0) -> jax.Array:
    """``[batch_size]`` keys: ``fold_in(key, first_index + i)`` for each example ``i``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(batch_size))


def _per_example(key: jax.Array, batch_size: int) -> jax.Array:
    if key.ndim == 0:
        return example_keys(key, batch_size)
    if key.shape != (batch_size,):
        raise ValueError(f"key must be one key or one key per example ({batch_size},); got shape {key.shape}.")
    return key


def _salted(keys: jax.Array, salt: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, salt))(keys)


def random_crop(key: jax.Array, images: jax.Array, *, padding: int) -> jax.Array:
    """Zero-pad by ``padding`` on each side, then crop back at a random offset per image.

    ``[B, H, W, C] -> [B, H, W, C]``; offsets are uniform in ``[0, 2 * padding]``, drawn from
    each example's key (see the module docstring).
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0; got {padding}.")
    if padding == 0:
        return images
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    keys = _per_example(key, b)
    offsets = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 2 * padding + 1))(keys)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2 (each example's key). ``[B, H, W, C]``."""
    flip = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(_per_example(key, images.shape[0]))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def mix_with_next(keys: jax.Array, views: jax.Array, *, alpha: float) -> jax.Array:
    """Mixup (Zhang et al. 2018) for function matching: ``lam_i x_i + (1 - lam_i) x_{i+1}``.

    Each example is mixed with the next one of the batch (the last with the first), with its
    own ``lam_i ~ Beta(alpha, alpha)`` drawn from its own key, so the view does not depend on
    the device count (the data order is shuffled, so the partners are random). There is no
    label to mix: under function matching (Beyer et al. 2022) the teacher, which sees the same
    mixed view, gives the only target. ``views`` float ``[B, ...]``, ``keys`` ``[B]``.
    """
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0; got {alpha}.")
    lam = jax.vmap(lambda k: jax.random.beta(k, alpha, alpha))(keys).astype(views.dtype)
    lam = lam.reshape((-1,) + (1,) * (views.ndim - 1))
    return lam * views + (1 - lam) * jnp.roll(views, -1, axis=0)


def augment(
    key: jax.Array,
    images: jax.Array,
    *,
    mean,
    std,
    crop_padding: int = 0,
    flip: bool = False,
    mixup_alpha: float = 0.0,
) -> jax.Array:
    """Crop, flip, normalise and (``mixup_alpha > 0``) mix a uint8 batch: the one view both
    models see. -> float32.

    Mixed views (:func:`mix_with_next`) have no single label: use them with an objective that
    reads the teacher only (``objectives.FunctionMatching``); the experiment refuses others.
    """
    keys = _per_example(key, images.shape[0])
    images = random_crop(_salted(keys, 0), images, padding=crop_padding)
    if flip:
        images = random_flip(_salted(keys, 1), images)
    views = normalize(images, mean, std)
    if mixup_alpha:
        views = mix_with_next(_salted(keys, 2), views, alpha=mixup_alpha)
    return views
