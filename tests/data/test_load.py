"""Datasets by name, .npz and image folder all become TFDS array_record datasets."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jkd.data import load_dataset, load_mnist_sample
from jkd.data import pipeline as P


def _records(src):
    recs = src.__getitems__(list(range(len(src))))
    return np.stack([r["image"] for r in recs]), np.array([r["label"] for r in recs])


def _same_multiset(xa, ya, xb, yb):
    key = lambda x, y: sorted(zip([r.tobytes() for r in x], y.tolist()))  # noqa: E731
    return key(xa, ya) == key(xb, yb)


def test_embedded_default_is_a_prepared_tfds_dataset(embedded, data_dir):
    assert embedded.spec.name == "jkd_mnist_sample"
    assert embedded.spec.num_classes == 10 and embedded.spec.image_shape == (28, 28, 1)
    assert embedded.spec.flip is False
    files = sorted(p.name for p in (data_dir / "jkd_mnist_sample" / "1.0.0").iterdir())
    assert any(f.startswith("jkd_mnist_sample-train.array_record") for f in files)
    for split in ("train", "test"):
        x, y = _records(embedded.split(split))
        assert _same_multiset(x, y, *load_mnist_sample(split))  # same images, same labels


def test_embedded_default_is_prepared_once(embedded, data_dir, monkeypatch):
    import jkd.data.builders as B

    monkeypatch.setattr(B, "_load_embedded", lambda: pytest.fail("prepared twice"))
    again = load_dataset(data_dir=data_dir)
    assert len(again.split("train")) == 4000


@pytest.mark.parametrize(
    "name,classes,shape,flip",
    [
        ("mnist", 10, (28, 28, 1), False),
        ("fashion_mnist", 10, (28, 28, 1), True),
        ("cifar10", 10, (32, 32, 3), True),
        ("cifar100", 100, (32, 32, 3), True),
        ("imagenette", 10, (160, 160, 3), True),
    ],
)
def test_tfds_names_offline_with_mock_data(tmp_path, name, classes, shape, flip):
    with tfds.testing.mock_data(num_examples=24):
        ds = load_dataset(name, data_dir=tmp_path)
        assert (ds.spec.num_classes, ds.spec.image_shape, ds.spec.flip) == (classes, shape, flip)
        batch = next(P.train_batches(P.reader(ds.split("train"), shape), batch_size=8, seed=0))
    assert batch["image"].shape == (8,) + shape and batch["image"].dtype == np.uint8
    assert batch["label"].min() >= 0 and batch["label"].max() < classes


def test_missing_tfds_dataset_says_it_cannot_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'cifar10' is not prepared.*does not download"):
        load_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'no_such_data'"):
        load_dataset("no_such_data", data_dir=tmp_path)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _digits(rng, n, shape=(12, 10)):
    return rng.integers(0, 256, (n,) + shape, dtype=np.uint8), rng.integers(0, 3, n)


def test_npz_becomes_tfds(tmp_path):
    rng = np.random.default_rng(0)
    (xtr, ytr), (xte, yte) = _digits(rng, 30), _digits(rng, 9)
    ytr[:3] = [0, 1, 2]
    path = _npz(tmp_path / "mine.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = load_dataset(path, data_dir=tmp_path / "tfds")
    assert ds.spec.name == "npz:mine" and ds.spec.num_classes == 3
    assert ds.spec.image_shape == (12, 10, 1)
    assert list((tmp_path / "tfds" / "jkd_user" / "npz").glob("mine-*/user_images/1.0.0/*.array_record*"))
    x, y = _records(ds.split("train"))
    assert _same_multiset(x, y, xtr[..., None], ytr)
    # Statistics of a dataset jkd does not know are computed from its training split.
    np.testing.assert_allclose(ds.spec.mean, [xtr.mean() / 255], rtol=1e-6)


def test_float_images_in_unit_range_are_accepted(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((6, 4, 4, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 0, 1])
    ds = load_dataset(_npz(tmp_path / "f.npz", x_train=x, y_train=y, x_test=x, y_test=y), data_dir=tmp_path)
    xs, _ = _records(ds.split("test"))
    assert xs.dtype == np.uint8 and xs.shape == (6, 4, 4, 3)


def _write_folder(root, sizes):
    rng = np.random.default_rng(2)
    for cls, n in (("cat", 5), ("dog", 6)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            size = sizes(cls, i)
            Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_image_folder_becomes_tfds(tmp_path):
    _write_folder(tmp_path / "pets", lambda c, i: (8, 8))
    ds = load_dataset(tmp_path / "pets", data_dir=tmp_path / "tfds")
    assert ds.spec.name == "folder:pets" and ds.spec.num_classes == 2
    assert ds.spec.image_shape == (8, 8, 3) and ds.spec.flip is True
    # every fifth image per class is test: cat 5 -> 1, dog 6 -> 1
    assert len(ds.split("train")) == 9 and len(ds.split("test")) == 2
    _, y = _records(ds.split("train"))
    assert sorted(y.tolist()) == [0] * 4 + [1] * 5


# ---- bad input -----------------------------------------------------------------------------


def test_npz_without_expected_keys(tmp_path):
    path = _npz(tmp_path / "bad.npz", images=np.zeros((2, 4, 4)), labels=np.zeros(2))
    with pytest.raises(
        ValueError, match=r"lacks the keys \['x_train', 'y_train', 'x_test', 'y_test'\]; found \['images', 'labels'\]"
    ):
        load_dataset(path, data_dir=tmp_path)


def test_labels_out_of_range(tmp_path):
    x = np.zeros((4, 4, 4), np.uint8)
    path = _npz(tmp_path / "l.npz", x_train=x, y_train=np.array([0, 1, 2, 1]), x_test=x, y_test=np.array([0, 1, 5, -1]))
    with pytest.raises(ValueError, match=r"l\.npz: y_test holds 1 negative label\(s\) \(the first, -1, at index 3\)"):
        load_dataset(path, data_dir=tmp_path)
    path = _npz(tmp_path / "l.npz", x_train=x, y_train=np.array([0, 1, 2, 1]), x_test=x, y_test=np.array([0, 1, 5, 2]))
    with pytest.raises(ValueError, match=r"labels of split 'test' lie in \[0, 5\]; expected 0..2 for 3 classes"):
        load_dataset(path, data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"expected 0..1 for 2 classes"):
        load_dataset(path, data_dir=tmp_path, num_classes=2)


def test_empty_split(tmp_path):
    x = np.zeros((4, 4, 4), np.uint8)
    path = _npz(
        tmp_path / "e.npz",
        x_train=x,
        y_train=np.array([0, 1, 0, 1]),
        x_test=np.zeros((0, 4, 4), np.uint8),
        y_test=np.zeros(0, int),
    )
    with pytest.raises(ValueError, match="split 'test' is empty"):
        load_dataset(path, data_dir=tmp_path)


def test_mixed_image_sizes(tmp_path):
    _write_folder(tmp_path / "mixed", lambda c, i: (8, 8) if i else (9, 7))
    with pytest.raises(ValueError, match=r"mixed sizes \[\(8, 8, 3\), \(9, 7, 3\)\].*expected one size"):
        load_dataset(tmp_path / "mixed", data_dir=tmp_path / "tfds")


def test_mismatched_label_count_and_missing_file(tmp_path):
    x = np.zeros((4, 4, 4), np.uint8)
    path = _npz(tmp_path / "m.npz", x_train=x, y_train=np.array([0, 1, 0]), x_test=x, y_test=np.array([0, 1, 0, 1]))
    with pytest.raises(
        ValueError, match=r"y_train must be a 1-D array with one label per image \(4\); got shape \(3,\)"
    ):
        load_dataset(path, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no .npz file"):
        load_dataset(tmp_path / "absent.npz", data_dir=tmp_path)


def test_failed_preparation_leaves_nothing_complete(tmp_path, monkeypatch):
    import jkd.data.builders as B

    rng = np.random.default_rng(3)
    (xtr, ytr), (xte, yte) = _digits(rng, 20), _digits(rng, 5)
    path = _npz(tmp_path / "crash.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    original = B._ImageArraysBuilder._generate_examples

    def crash_midway(self, images, labels):
        for n, item in enumerate(original(self, images, labels)):
            if n == 10:
                raise RuntimeError("disk full")
            yield item

    monkeypatch.setattr(B._ImageArraysBuilder, "_generate_examples", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        load_dataset(path, data_dir=tmp_path / "tfds")
    # No version folder (what TFDS takes as a prepared dataset) exists, only its scratch.
    assert not [p for p in (tmp_path / "tfds").rglob("1.0.0") if p.is_dir()]
    monkeypatch.undo()
    ds = load_dataset(path, data_dir=tmp_path / "tfds")  # a later run prepares it afresh
    assert len(ds.split("train")) == 20 and len(ds.split("test")) == 5


def test_embedded_default_is_registered_with_tfds(data_dir, embedded):
    builder = tfds.builder("jkd_mnist_sample", data_dir=str(data_dir))
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 4000
    assert builder.info.splits["test"].num_examples == 1000
