"""One entry point for every dataset: a TFDS name, a ``.npz`` file or an image folder."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jkd.data import builders, user
from jkd.data.spec import DEFAULT_IMAGE_SIZE, KNOWN, DatasetSpec, RandomAccessSource

DEFAULT = "jkd_mnist_sample"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset's spec and its splits as random-access sources (``train``, ``test``)."""

    spec: DatasetSpec
    splits: dict[str, RandomAccessSource]

    def split(self, name: str) -> RandomAccessSource:
        if name not in self.splits:
            raise ValueError(f"{self.spec.name} has no split {name!r}; it has {sorted(self.splits)}.")
        return self.splits[name]


def default_data_dir() -> Path:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets`` (TFDS's own default)."""
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))


def _spec(name: str, image_shape: tuple, num_classes: int, train: RandomAccessSource) -> DatasetSpec:
    if None in image_shape or len(image_shape) != 3:
        raise ValueError(
            f"{name}: images must have one fixed shape (H, W, C); TFDS reports {image_shape}. "
            "Pass image_size to resize them."
        )
    shape = tuple(int(d) for d in image_shape)
    if name in KNOWN:
        mean, std, flip = KNOWN[name]
    else:
        mean, std = channel_stats(train)
        flip = shape[-1] != 1
    return DatasetSpec(
        name=name,
        num_classes=int(num_classes),
        image_shape=shape,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        flip=flip,
    )


def channel_stats(source: RandomAccessSource, max_images: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std on the [0, 1] scale, from up to ``max_images`` (evenly spaced)."""
    idx = np.linspace(0, len(source) - 1, min(len(source), max_images)).astype(int)
    x = np.stack([r["image"] for r in source.__getitems__(idx.tolist())]).astype(np.float64) / 255
    axes = tuple(range(x.ndim - 1))
    return x.mean(axis=axes), np.maximum(x.std(axis=axes), 1e-3)


class _PerItemReads:
    """Batched reads done one record at a time.

    ``tfds.testing.mock_data`` (tfds 4.9.10) installs ``__getitems__`` on its mock without
    binding ``self``, so batched reads of a mocked source fail; this adapter keeps the
    mocked path identical otherwise.
    """

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitems__(self, indices):
        return [self._source[int(i)] for i in indices]


class _Resized:
    """Centre-crop each image to a square and resize it to ``size x size`` (PIL, bilinear)."""

    def __init__(self, source, size: int):
        self._source, self._size = source, size

    def __len__(self) -> int:
        return len(self._source)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[top : top + side, left : left + side]
        im = Image.fromarray(square.squeeze(-1) if square.shape[-1] == 1 else square)
        out = np.asarray(im.resize((self._size, self._size), Image.BILINEAR))
        return out.reshape(self._size, self._size, image.shape[-1])

    def __getitems__(self, indices):
        return [{**r, "image": self._resize(r["image"])} for r in self._source.__getitems__(indices)]


def _batched_reads(source) -> RandomAccessSource:
    try:
        source.__getitems__([0])
    except TypeError:
        return _PerItemReads(source)
    return source


def _open_splits(builder: tfds.core.DatasetBuilder) -> dict[str, RandomAccessSource]:
    return {s: _batched_reads(builder.as_data_source(s)) for s in ("train", "test")}


def _dataset(name: str, builder, splits, image_size: int | None = None) -> Dataset:
    features = builder.info.features
    shape = tuple(features["image"].shape)
    if image_size is not None:
        splits = {s: _Resized(src, image_size) for s, src in splits.items()}
        shape = (image_size, image_size, shape[-1])
    return Dataset(_spec(name, shape, features["label"].num_classes, splits["train"]), splits)


def _user_dataset(kind: str, path: Path, arrays, data_dir: Path, num_classes: int | None) -> Dataset:
    arrays, num_classes = user.validate(arrays, num_classes=num_classes, source=str(path))
    tag = f"{path.stem}-{builders.fingerprint(arrays)}"
    builder = builders.prepare_user_arrays(
        arrays,
        num_classes=num_classes,
        data_dir=data_dir / "jkd_user" / kind / tag,
        description=f"{kind} dataset prepared from {path}",
    )
    return _dataset(f"{kind}:{path.stem}", builder, _open_splits(builder))


def load_dataset(
    source: str | os.PathLike = DEFAULT,
    *,
    data_dir: str | os.PathLike | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Load a dataset by TFDS name, ``.npz`` path or image-folder path, preparing it once.

    Args:
      source: ``"jkd_mnist_sample"`` (the embedded default, no network), a TFDS name such as
        ``"mnist"``, ``"cifar10"``, ``"cifar100"``, ``"fashion_mnist"``, ``"imagenette"``
        (prepared under ``data_dir``; jkd never downloads), a ``.npz`` file with ``x_train,
        y_train, x_test, y_test``, or a folder with one sub-folder of images per class.
      data_dir: where TFDS datasets live and user data is prepared (default: TFDS's).
      num_classes: for user data, the number of classes (default: max train label + 1).
      image_size: for TFDS datasets, resize images to ``image_size`` squares (centre crop
        first); needed for datasets of mixed image sizes (imagenette defaults to 160).

    Returns:
      A :class:`Dataset` whose splits are random-access TFDS data sources.
    """
    tfds.display_progress_bar(False)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = Path(source)
    if str(source).endswith(".npz") or path.is_file():
        return _user_dataset("npz", path, user.read_npz(path), data_dir, num_classes)
    if path.is_dir():
        arrays, _ = user.read_image_folder(path)
        return _user_dataset("folder", path, arrays, data_dir, num_classes)
    name = str(source)
    if num_classes is not None:
        raise ValueError(f"num_classes is only for user data (.npz or folder); {name} defines its own.")
    if name == DEFAULT:
        builder = builders.JkdMnistSample(data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare()
        return _dataset(name, builder, _open_splits(builder))
    try:
        builder = tfds.builder(name, data_dir=str(data_dir))
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"unknown dataset {name!r}: not a TFDS name, and no .npz file or folder at that path.") from e
    try:
        splits = _open_splits(builder)
    except (AssertionError, FileNotFoundError, NotImplementedError, KeyError, ValueError) as e:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared (as array_record) under {data_dir}, and jkd "
            f"does not download. Prepare it where a network is available (tfds build {name} "
            f"--data_dir=DIR --file_format=array_record) and pass DIR as data_dir, or use the "
            f"embedded default {DEFAULT!r}. ({type(e).__name__}: {e})"
        ) from e
    return _dataset(name, builder, splits, image_size or DEFAULT_IMAGE_SIZE.get(name))
