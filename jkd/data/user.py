"""The user's own data: a ``.npz`` file or a folder of images, read and checked.

Both become ``{split: (images uint8 [N, H, W, C], labels int32 [N])}`` and then a TFDS
dataset (see :mod:`jkd.data.builders`). Every check names what was found and what was
expected, and runs before anything is written.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from jkd.data.builders import Arrays

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _as_images(x: np.ndarray, what: str) -> np.ndarray:
    """Accept ``[N,H,W]`` or ``[N,H,W,C]``, uint8 (0..255) or float in [0, 1]; return uint8 NHWC."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must have shape [N, H, W] or [N, H, W, C] with C in (1, 3, 4); got {x.shape}.")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise ValueError(
                f"{what} holds {bad} NaN or infinite pixel value(s) of {x.size}; expected finite "
                "values in [0, 1] (or uint8 images in 0..255). Fix or drop those images."
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{what} is floating point with values in [{lo:g}, {hi:g}]; expected [0, 1] "
                "(or pass uint8 images in 0..255)."
            )
        return np.round(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"{what} has integer values in [{x.min()}, {x.max()}]; expected 0..255.")
        return x.astype(np.uint8)
    raise ValueError(f"{what} must hold uint8 or float images; got dtype {x.dtype}.")


def validate(arrays: Arrays, *, num_classes: int | None = None, source: str = "data") -> tuple[Arrays, int]:
    """Check splits, sizes, shapes and labels; return normalised arrays and ``num_classes``.

    ``num_classes`` defaults to ``max(train labels) + 1``; every label of every split must lie
    in ``[0, num_classes)``.
    """
    out: Arrays = {}
    shape = None
    for split, (x, y) in arrays.items():
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"{source}: split '{split}' is empty; expected at least one image.")
        x = _as_images(x, f"{source}: x_{split}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{source}: y_{split} must be a 1-D array with one label per image ({len(x)}); got shape {y.shape}."
            )
        if not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
                y = y.astype(np.int64)
            else:
                raise ValueError(f"{source}: y_{split} must hold integer class labels; got dtype {y.dtype}.")
        if shape is None:
            shape = x.shape[1:]
        elif x.shape[1:] != shape:
            raise ValueError(
                f"{source}: images of split '{split}' have shape {x.shape[1:]}, but other splits "
                f"have {shape}; all images must have one size."
            )
        out[split] = (x, y.astype(np.int32))
    for split, (_, y) in out.items():  # before the class count is inferred from (and counted over) them
        if y.size and int(y.min()) < 0:
            first = int(np.argmax(y < 0))
            expected = f"0..{num_classes - 1}" if num_classes is not None else "0..K-1 (K classes)"
            raise ValueError(
                f"{source}: y_{split} holds {int(np.sum(y < 0))} negative label(s) (the first, {int(y[first])}, "
                f"at index {first}); class labels must lie in {expected}."
            )
    if num_classes is None:
        # Inferred: max + 1, and then every class must have training images (labels 1..10
        # would otherwise silently give an 11th class that is never seen).
        num_classes = int(out["train"][1].max()) + 1
        missing = sorted(set(range(num_classes)) - set(np.unique(out["train"][1]).tolist()))
        if missing and int(out["train"][1].min()) >= 0:
            raise ValueError(
                f"{source}: the training labels lie in [{int(out['train'][1].min())}, {num_classes - 1}], "
                f"which makes {num_classes} classes, but classes {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''} have no training image. Labels must be "
                f"0..K-1 with every class in train; if classes really have no training images, give "
                f"the class count explicitly (num_classes, --num-classes)."
            )
        if "test" in out and int(out["test"][1].min()) >= 0:
            train_counts = np.bincount(out["train"][1], minlength=num_classes)
            untested = sorted(set(range(num_classes)) - set(np.unique(out["test"][1]).tolist()))
            if untested:
                shown = ", ".join(f"{c} ({train_counts[c]} train images)" for c in untested[:10])
                raise ValueError(
                    f"{source}: classes {shown} have no test image, so the test split cannot measure "
                    "them (a stray label?). Fix the labels, or give the class count explicitly "
                    "(num_classes, --num-classes) to accept classes without test images."
                )
    for split, (_, y) in out.items():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{source}: labels of split '{split}' lie in [{lo}, {hi}]; expected "
                f"0..{num_classes - 1} for {num_classes} classes."
            )
    if num_classes < 2:
        raise ValueError(f"{source}: found {num_classes} class; classification needs at least 2.")
    return out, num_classes


def read_npz(path: os.PathLike | str) -> Arrays:
    """Read ``x_train, y_train, x_test, y_test`` from a ``.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .npz file at {path}.")
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path} is not a readable .npz file (numpy.savez/savez_compressed output with "
            f"{', '.join(NPZ_KEYS)}): {type(e).__name__}."
        ) from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} holds a single array, not a .npz archive; save the splits with "
            f"numpy.savez(path, {'=..., '.join(NPZ_KEYS)}=...)."
        )
    with f:
        missing = [k for k in NPZ_KEYS if k not in f.files]
        if missing:
            raise ValueError(
                f"{path} lacks the keys {missing}; found {sorted(f.files)}, expected "
                f"{list(NPZ_KEYS)} (images [N, H, W(, C)] and integer labels [N])."
            )
        arrays = {}
        for key in NPZ_KEYS:
            try:
                arrays[key] = f[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                kind = (
                    "holds Python objects (dtype=object); jkd needs numeric arrays"
                    if "pickle" in str(e) or "Object arrays" in str(e)
                    else f"cannot be read ({e})"
                )
                raise ValueError(f"{path}: {key} {kind}: images as uint8 or float, labels as integers.") from e
        return {"train": (arrays["x_train"], arrays["y_train"]), "test": (arrays["x_test"], arrays["y_test"])}


def _read_class_folders(root: Path) -> tuple[list[np.ndarray], list[int], list[str], list[str]]:
    from PIL import Image

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root} must hold one sub-folder per class (at least 2); found {classes or 'none'}.")
    images, labels, names = [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)}); every class "
                "sub-folder needs images (remove the empty folder, or add its images)."
            )
        for p in files:
            try:
                with Image.open(p) as im:
                    images.append(np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")))
            except (OSError, ValueError, SyntaxError) as e:  # PIL: unidentified, truncated, broken
                raise ValueError(
                    f"cannot read the image {p} ({type(e).__name__}: {e}); fix or remove that file."
                ) from e
            labels.append(label)
            names.append(str(p))
    return images, labels, classes, names


def read_image_folder(path: os.PathLike | str) -> tuple[Arrays, list[str]]:
    """Read ``<path>/<class>/*.png``; or ``<path>/train/<class>/`` and ``<path>/test/<class>/``.

    Without ``train``/``test`` sub-folders, every fifth image of each class (sorted by file
    name) goes to ``test``. Class indices follow the sorted sub-folder names. Returns the
    arrays and the class names.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}.")
    split_dirs = {s: root / s for s in ("train", "test") if (root / s).is_dir()}
    groups = {}
    if split_dirs:
        if set(split_dirs) != {"train", "test"}:
            raise ValueError(f"{root} has {sorted(split_dirs)} but needs both train/ and test/ sub-folders.")
        for split, d in split_dirs.items():
            groups[split] = _read_class_folders(d)
        if groups["train"][2] != groups["test"][2]:
            raise ValueError(
                f"train/ and test/ of {root} must hold the same class folders; got "
                f"{groups['train'][2]} and {groups['test'][2]}."
            )
        class_names = groups["train"][2]
        lists = {s: (g[0], g[1], g[3]) for s, g in groups.items()}
    else:
        images, labels, class_names, files = _read_class_folders(root)
        labels = np.asarray(labels)
        rank = np.zeros(len(labels), int)
        for k in range(len(class_names)):
            idx = np.flatnonzero(labels == k)
            rank[idx] = np.arange(len(idx))
        is_test = rank % 5 == 4
        lists = {
            "train": (
                [im for im, t in zip(images, is_test) if not t],
                labels[~is_test],
                [f for f, t in zip(files, is_test) if not t],
            ),
            "test": (
                [im for im, t in zip(images, is_test) if t],
                labels[is_test],
                [f for f, t in zip(files, is_test) if t],
            ),
        }
    arrays = {}
    for split, (images, labels, files) in lists.items():
        grey = [f for im, f in zip(images, files) if im.ndim == 2]
        if grey and len(grey) < len(images):
            colour = [f for im, f in zip(images, files) if im.ndim == 3]
            raise ValueError(
                f"images in {root} mix greyscale and colour: {len(grey)} greyscale (e.g. {grey[0]}) and "
                f"{len(colour)} colour (e.g. {colour[0]}); convert them to one mode (all greyscale or all RGB)."
            )
        shapes = sorted({im.shape for im in images})
        if len(shapes) > 1:
            raise ValueError(
                f"images in {root} have mixed sizes {shapes[:4]}{' ...' if len(shapes) > 4 else ''}; "
                "expected one size (resize them first)."
            )
        if not images:
            raise ValueError(f"{root}: split '{split}' has no images ({', '.join(IMAGE_SUFFIXES)}).")
        arrays[split] = (np.stack(images), np.asarray(labels, np.int32))
    return arrays, class_names
