"""Tiny models and batches shared by the train tests."""

import functools

import numpy as np

from jkd.data import augment
from jkd.models import create_model
from jkd.train import SGDConfig, create_train_state, freeze_model, make_optimizer, train_step

SHAPE = (8, 8, 1)
NORMALIZE_ONLY = functools.partial(augment.augment, mean=(0.5,), std=(0.25,))
CROP_FLIP = functools.partial(augment.augment, mean=(0.5,), std=(0.25,), crop_padding=1, flip=True)


def batches(n, batch_size=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = rng.integers(0, 4, batch_size).astype(np.int32)
        images = rng.integers(0, 60, (batch_size, *SHAPE)).astype(np.uint8)
        images[np.arange(batch_size), labels, labels, 0] = 255  # a learnable signal
        out.append({"image": images, "label": labels})
    return out


def tx(lr=0.1, weight_decay=5e-4):
    return make_optimizer(
        SGDConfig(learning_rate=lr, weight_decay=weight_decay, decay_epochs=()), steps_per_epoch=10, total_steps=100
    )


def teacher(bn_axis_name=None):
    return freeze_model(
        create_model("cnn", num_classes=4, input_shape=SHAPE, seed=0, width=8, bn_axis_name=bn_axis_name)
    )


def student(seed=1, bn_axis_name=None, optimizer=None, state_seed=0):
    model = create_model("cnn", num_classes=4, input_shape=SHAPE, seed=seed, width=4, bn_axis_name=bn_axis_name)
    return create_train_state(model, optimizer or tx(), seed=state_seed)


def step_fn(graphdef, teacher_graphdef=None, view_fn=NORMALIZE_ONLY, optimizer=None, step=train_step):
    return functools.partial(
        step, graphdef=graphdef, tx=optimizer or tx(), view_fn=view_fn, teacher_graphdef=teacher_graphdef
    )


def max_abs_diff(a, b):
    import jax

    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
