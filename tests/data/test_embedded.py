import numpy as np
import pytest

from jkd.data import load_mnist_sample


def test_fixed_balanced_disjoint_split():
    xtr, ytr = load_mnist_sample("train")
    xte, yte = load_mnist_sample("test")
    assert xtr.shape == (4000, 28, 28, 1) and xte.shape == (1000, 28, 28, 1)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ytr), [400] * 10)
    np.testing.assert_array_equal(np.bincount(yte), [100] * 10)
    # No test image appears in train (compare raw bytes of every image).
    train_rows = {row.tobytes() for row in xtr}
    assert not any(row.tobytes() in train_rows for row in xte)
    # Real digits: ink on a dark background, not constant images.
    assert 20 < xtr.mean() < 60 and xtr.max() == 255


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'; got 'val'"):
        load_mnist_sample("val")
