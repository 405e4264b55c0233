"""Datasets (TFDS, the embedded default, the user's own), grain pipelines, JAX augmentation."""

from jkd.data.builders import JkdMnistSample
from jkd.data.embedded import load_mnist_sample
from jkd.data.load import DEFAULT
from jkd.data.load import Dataset
from jkd.data.load import load_dataset
from jkd.data.spec import DatasetSpec

__all__ = ["DEFAULT", "Dataset", "DatasetSpec", "JkdMnistSample", "load_dataset", "load_mnist_sample"]
