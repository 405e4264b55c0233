"""Short fingerprints of a run's inputs (data files, teacher folders) for the run folder's guard.

A run that reads a file or a folder by path records its fingerprint in ``config.json``, so that an
input edited or replaced in place is a changed configuration, never silently the old run's. A
fingerprint reads little of a large file: files up to :data:`FULL_HASH_BYTES` are hashed whole;
larger ones by their size, their first MiB (a safetensors header and its first tensors) and
:data:`SAMPLES` blocks spread evenly over the rest, so a teacher of many gigabytes costs a few
megabytes of reading on each start. A folder of many files (an image dataset) is read whole up
to :data:`FOLDER_BUDGET_BYTES`; the files past that are fingerprinted by their names, sizes and
first :data:`BLOCK_BYTES`. Modification times are left out: a copied folder is the same input.
Retraining a checkpoint in place changes every tensor, so the sampled blocks see it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_HASH_BYTES = 64 << 20
HEAD_BYTES = 1 << 20
SAMPLES = 64
BLOCK_BYTES = 64 << 10
FOLDER_BUDGET_BYTES = 256 << 20


def file_fingerprint(path: str | Path, *, head_only: bool = False) -> str:
    """A 16-hex-digit fingerprint of one file's contents (see the module docstring); with
    ``head_only``, of its size and first :data:`BLOCK_BYTES` alone."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=8)
    h.update(str(size).encode())
    with path.open("rb") as f:
        if head_only:
            h.update(f.read(BLOCK_BYTES))
        elif size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(HEAD_BYTES))
            stride = (size - HEAD_BYTES) // SAMPLES
            for k in range(SAMPLES):
                f.seek(HEAD_BYTES + k * stride)
                h.update(f.read(BLOCK_BYTES))
            f.seek(size - BLOCK_BYTES)
            h.update(f.read(BLOCK_BYTES))
    return h.hexdigest()


def folder_fingerprint(path: str | Path) -> str:
    """A fingerprint of every file below a folder (names and contents; hidden files and
    ``__pycache__`` left out; past :data:`FOLDER_BUDGET_BYTES`, sizes and heads only)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=8)
    read = 0
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        size = p.stat().st_size
        head_only = read >= FOLDER_BUDGET_BYTES
        read += BLOCK_BYTES if head_only else min(size, FULL_HASH_BYTES)
        h.update(rel.as_posix().encode() + b"\0" + file_fingerprint(p, head_only=head_only).encode())
    return h.hexdigest()


def input_fingerprint(path: str | Path | None) -> str | None:
    """The fingerprint of a file or a folder; None when ``path`` is None or names nothing (reading
    it later reports that clearly)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return file_fingerprint(p)
    if p.is_dir():
        return folder_fingerprint(p)
    return None
