"""A small, real distillation on the embedded MNIST sample, in plain JAX.

This is the interim ``jkd demo`` (until the Flax models and the full report land). Fed by
the jkd pipeline from the embedded default, it trains a 2x1200 MLP teacher (random crops,
padding 2), then three seeds of a 784-100-10 student alone and three distilled from the
teacher with soft KD, all students of a setting in one ``vmap``-ed step sharing the teacher's
forward pass. It prints test accuracy as mean +- std over seeds.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jkd import losses
from jkd.data import DatasetSpec, augment, load_dataset
from jkd.data.pipeline import InMemory, to_memory, train_batches

Params = list[tuple[jax.Array, jax.Array]]


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> Params:
    """He-normal weights, zero biases, for layer widths ``sizes`` (input first)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n), jnp.float32) * jnp.sqrt(2.0 / m), jnp.zeros((n,), jnp.float32))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp(params: Params, x: jax.Array) -> jax.Array:
    """``[B, D] -> [B, num_classes]`` logits; ReLU between layers."""
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def fit(
    loss_fn: Callable, params, data: InMemory, spec: DatasetSpec, *, epochs: int, batch: int,
    lr: float, seed: int, crop_padding: int, extra=(),
):
    """Adam with cosine decay over ``epochs``, fed by the jkd pipeline; returns ``params``.

    ``loss_fn(params, x [B, D] float32, labels [B], *extra) -> scalar``; ``x`` is the one
    augmented view of the batch (random crop with ``crop_padding``, normalised), which the
    teacher inside ``loss_fn`` sees as well. ``params`` may be stacked over a leading axis of
    students: ``loss_fn`` then sums their losses.
    """
    per_epoch = len(data) // batch
    opt = optax.adam(optax.cosine_decay_schedule(lr, epochs * per_epoch))
    state = opt.init(params)

    @jax.jit
    def step(params, state, key, images, labels, *extra):
        view = augment.augment(key, images, mean=spec.mean, std=spec.std, crop_padding=crop_padding)
        x = view.reshape(view.shape[0], -1)
        loss, g = jax.value_and_grad(loss_fn)(params, x, labels, *extra)
        # optax's Adam computes 1 - b1**count with an int32 count, which strict dtype
        # promotion rejects; jkd's own code stays strict-clean (see BUILD_NOTES.md).
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    key = jax.random.key(seed)
    stream = train_batches(data, batch_size=batch, seed=seed, num_epochs=epochs)
    for i, b in enumerate(stream):
        key, sub = jax.random.split(key)
        params, state, loss = step(params, state, sub, b["image"], b["label"], *extra)
        epoch, last = divmod(i + 1, per_epoch)
        if last == 0 and (epoch % 10 == 1 or epoch == epochs):
            print(f"    epoch {epoch:3d}/{epochs}  loss {float(loss):.4f}", flush=True)
    return params


def main(epochs: int = 40, seeds: int = 3, temperature: float = 8.0) -> dict[str, list[float]]:
    t0 = time.perf_counter()
    ds = load_dataset()  # the embedded default, prepared once as a TFDS dataset
    train, test = to_memory(ds.split("train")), to_memory(ds.split("test"))
    xte = augment.normalize(jnp.asarray(test.images), ds.spec.mean, ds.spec.std).reshape(len(test), -1)
    yte = jnp.asarray(test.labels)
    print(f"embedded MNIST sample: {len(train)} train / {len(test)} test images")

    print("teacher 784-1200-1200-10")
    def ce(p, xb, yb):
        return losses.cross_entropy_loss(mlp(p, xb), yb).mean()
    teacher = fit(ce, init_mlp(jax.random.key(0), (784, 1200, 1200, 10)), train, ds.spec,
                  epochs=max(1, epochs // 2), batch=128, lr=1e-3, seed=0, crop_padding=2)
    acc = lambda p, x, y: float(jnp.mean(jnp.argmax(mlp(p, x), -1) == y))  # noqa: E731
    results = {"teacher": [acc(teacher, xte, yte)]}

    student_sizes = (784, 100, 10)
    stacked = jax.vmap(lambda k: init_mlp(k, student_sizes))(jax.random.split(jax.random.key(1), seeds))
    many = jax.vmap(mlp, in_axes=(0, None))  # K students, one batch

    def alone(p, xb, yb):
        return losses.cross_entropy_loss(many(p, xb), yb).mean(axis=-1).sum()

    def distilled(p, xb, yb, teacher):
        t = jax.lax.stop_gradient(mlp(teacher, xb))  # one teacher forward for all students
        s = many(p, xb)
        kd = losses.soft_distillation_loss(s, t, temperature=temperature)
        return losses.distillation_objective(s, yb, kd, kd_weight=0.9, ce_weight=0.1).mean(-1).sum()

    for name, fn, extra in [("student alone", alone, ()), (f"soft KD, T={temperature:g}", distilled, (teacher,))]:
        print(f"{name}: {seeds} seeds of 784-100-10 in one vmapped step")
        p = fit(fn, stacked, train, ds.spec, epochs=epochs, batch=128, lr=1e-3, seed=1,
                crop_padding=0, extra=extra)
        results[name] = [acc(jax.tree.map(lambda a: a[i], p), xte, yte) for i in range(seeds)]

    print(f"\n{'model':<22} {'test accuracy (%)':>20}")
    for name, accs in results.items():
        a = 100 * np.array(accs)
        spread = f" +- {a.std():.2f}" if len(a) > 1 else ""
        print(f"{name:<22} {a.mean():>12.2f}{spread}")
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
