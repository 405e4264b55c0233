"""Datasets and input pipelines."""

from jkd.data.embedded import load_mnist_sample

__all__ = ["load_mnist_sample"]
