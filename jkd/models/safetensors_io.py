"""Reading and writing the safetensors format, one tensor at a time, with no dependency.

The format: an 8-byte little-endian header length, a JSON header (``name -> {dtype, shape,
data_offsets}`` plus optional ``__metadata__``), then the raw little-endian data. jkd reads each
tensor with one positioned read into a fresh array (not a memory map: pages touched through a map
stay in the process's resident memory until it is closed, which would double a model's
footprint while it loads), so loading holds at most one checkpoint tensor beside the model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(bool),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A file that is not valid safetensors."""


class TensorInfo:
    """Where one tensor lies in a file."""

    __slots__ = ("path", "name", "dtype", "shape", "start", "end")

    def __init__(self, path: Path, name: str, dtype: np.dtype, shape: tuple[int, ...], start: int, end: int):
        self.path, self.name, self.dtype, self.shape, self.start, self.end = path, name, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, reading only its header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(
                f"{path}: header length {n} does not fit the file ({size} bytes); not a safetensors file, or truncated"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
    base = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, e in header.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(d) for d in e["shape"])
            start, end = (int(o) for o in e["data_offsets"])
        except KeyError as k:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has dtype/field {k} that jkd does not read (dtypes: {sorted(DTYPES)})"
            ) from None
        if end - start != int(np.prod(shape)) * dtype.itemsize or base + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({e['dtype']} {list(shape)}) has data offsets "
                f"[{start}, {end}) that do not match its shape or lie past the file's "
                f"end ({size} bytes); truncated file?"
            )
        tensors[name] = TensorInfo(path, name, dtype, shape, base + start, base + end)
    return tensors, metadata


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor's data as a fresh, writable array (one positioned read)."""
    out = np.empty(info.shape, info.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(info.path, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.start + done)
            if got <= 0:
                raise SafetensorsError(f"{info.path}: unexpected end of file in tensor {info.name!r}")
            done += got
    finally:
        os.close(fd)
    return out


def write_file(
    path: str | Path,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    fetch,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file; ``tensors`` lists ``(name, shape, dtype)`` and ``fetch(name)``
    returns each array when its turn comes (so only one is held at a time)."""
    entries, offset = {}, 0
    order = list(tensors)
    for name, shape, dtype in order:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        entries[name] = {
            "dtype": _NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = {"__metadata__": metadata or {"format": "pt"}, **entries}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in order:
            a = np.ascontiguousarray(fetch(name), dtype=dtype)
            if a.shape != tuple(shape):
                raise ValueError(f"write_file: {name} has shape {a.shape}, declared {tuple(shape)}")
            f.write(a.reshape(-1).view(np.uint8).data)
