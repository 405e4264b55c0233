"""Datasets (TFDS, the embedded default, the user's own), grain pipelines, JAX augmentation, and
text for language models (tokenizers, chat templates).

The names below load their modules on first use, so that ``jkd.data.chat`` or
``jkd.data.augment`` do not import TensorFlow Datasets.
"""

import importlib

_LAZY = {
    "JkdMnistSample": "jkd.data.builders",
    "load_mnist_sample": "jkd.data.embedded",
    "DEFAULT": "jkd.data.load",
    "Dataset": "jkd.data.load",
    "load_dataset": "jkd.data.load",
    "DatasetSpec": "jkd.data.spec",
}

__all__ = ["DEFAULT", "Dataset", "DatasetSpec", "JkdMnistSample", "load_dataset", "load_mnist_sample"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jkd.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
