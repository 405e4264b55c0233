"""What the rest of jkd needs to know about a dataset, and the per-dataset constants."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


class RandomAccessSource(Protocol):
    """What TFDS's ``as_data_source`` returns: ``len`` and batched reads of dict records."""

    def __len__(self) -> int: ...
    def __getitems__(self, indices) -> list[dict[str, Any]]: ...


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about an image-classification dataset.

    Attributes:
      name: dataset name (a TFDS name, or ``npz:<stem>`` / ``folder:<stem>`` for user data).
      num_classes: labels lie in ``[0, num_classes)``.
      image_shape: ``(H, W, C)`` of one uint8 image.
      mean, std: per-channel normalisation constants on the [0, 1] scale.
      flip: whether horizontal flips are a valid augmentation (off for digits and text).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool


# Per-dataset normalisation (train-split statistics on the [0, 1] scale) and whether a
# horizontal flip preserves the label. Datasets not listed get statistics computed from
# their training split and flips on (unless they are single-channel).
KNOWN = {
    "jkd_mnist_sample": ((0.1307,), (0.3081,), False),
    "mnist": ((0.1307,), (0.3081,), False),
    "fashion_mnist": ((0.2860,), (0.3530,), True),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True),
}

# Datasets whose images vary in size are resized (centre square crop, then resize) to this
# side length unless the caller asks for another.
DEFAULT_IMAGE_SIZE = {"imagenette": 160}
