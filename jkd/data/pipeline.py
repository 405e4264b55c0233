"""Input pipelines on grain: deterministic shuffling, epochs, batching, sharding, prefetch.

A training stream is a grain ``MapDataset`` whose element ``i`` is global batch ``i``: its
indices come from the permutation of epoch ``i // batches_per_epoch``, seeded by
``(seed, epoch)``. Random access by batch number makes the position trivially checkpointable
(it is the number of batches consumed) and resuming exact. Each process reads only its own
slice of every global batch. Small splits are first copied into memory (one batched read);
larger ones are read a batch of indices at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from jkd.data.spec import RandomAccessSource

Batch = dict[str, np.ndarray]  # image uint8 [B,H,W,C], label int32 [B], index int64 [B], mask bool [B]

IN_MEMORY_LIMIT_BYTES = 2 << 30  # splits up to 2 GiB of pixels are held in RAM


@dataclasses.dataclass(frozen=True)
class InMemory:
    """A split held as arrays: ``images [N, H, W, C] uint8`` and ``labels [N] int32``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True)
class OnDisk:
    """A split read a batch of indices at a time from a TFDS data source."""

    source: RandomAccessSource

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        records = self.source.__getitems__(indices.tolist())
        images = np.stack([r["image"] for r in records])
        labels = np.asarray([r["label"] for r in records], np.int32)
        return images, labels


def to_memory(source: RandomAccessSource, chunk: int = 8192) -> InMemory:
    """Read a whole split into arrays (batched reads of ``chunk`` records)."""
    disk = OnDisk(source)
    parts = [disk.read(np.arange(i, min(i + chunk, len(source)))) for i in range(0, len(source), chunk)]
    return InMemory(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def reader(source: RandomAccessSource, image_shape: tuple[int, ...], in_memory: bool | None = None):
    """``InMemory`` when the split fits (or when asked), else ``OnDisk``."""
    if in_memory is None:
        in_memory = len(source) * int(np.prod(image_shape)) <= IN_MEMORY_LIMIT_BYTES
    return to_memory(source) if in_memory else OnDisk(source)


def _check_sharding(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch < 1:
        raise ValueError(f"batch_size must be >= 1; got {global_batch}.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, {process_count}); got {process_index}.")
    if global_batch % process_count:
        raise ValueError(
            f"batch_size {global_batch} must be divisible by the process count {process_count} "
            "(each process feeds an equal share of every global batch)."
        )
    return global_batch // process_count


class _TrainBatch:
    """Global batch ``i`` -> this process's share of it (a picklable grain map function)."""

    def __init__(self, data, batch_size: int, seed: int, process_index: int, per_process: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.lo, self.hi = process_index * per_process, (process_index + 1) * per_process
        self.per_epoch = len(data) // batch_size
        self._cached = (-1, None)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        cached_epoch, perm = self._cached  # one tuple: safe under grain's reader threads
        if cached_epoch != epoch:  # batches come in order: one permutation per epoch
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            self._cached = (epoch, perm)
        return perm

    def __call__(self, step: int) -> Batch:
        epoch, b = divmod(int(step), self.per_epoch)
        idx = self.epoch_permutation(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        idx = idx[self.lo : self.hi]
        images, labels = self.data.read(idx)
        return {"image": images, "label": labels, "index": idx.astype(np.int64)}


def train_batches(
    data: InMemory | OnDisk,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    num_threads: int = 1,
) -> Iterator[Batch]:
    """Shuffled training batches; step ``start_step`` onwards (resume by passing the step).

    Args:
      data: from :func:`reader`.
      batch_size: the *global* batch size; each process yields ``batch_size / process_count``.
      seed: shuffling seed; epoch ``e`` uses the permutation seeded by ``(seed, e)``.
      num_epochs: stop after this many epochs (``None``: never). The last partial batch of
        every epoch is dropped so that all batches have one static shape.
      start_step: number of batches already consumed (the checkpointed data position).
      process_index, process_count: this process's share (``jax.process_index()``/``count()``).
      prefetch, num_threads: grain's read-ahead buffer and reader threads. One thread is
        best on a 2-core machine (2 threads compete with XLA: 0.88 vs 0.93 of the in-memory
        speed, `benchmarks/data_pipeline.py`); raise it for on-disk reads on bigger hosts.

    Yields:
      ``{"image": uint8 [b,H,W,C], "label": int32 [b], "index": int64 [b]}`` with
      ``b = batch_size / process_count``; ``index`` is the example's position in the split.
    """
    per_process = _check_sharding(batch_size, process_index, process_count)
    if len(data) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the split's {len(data)} examples.")
    fn = _TrainBatch(data, batch_size, seed, process_index, per_process)
    total = None if num_epochs is None else num_epochs * fn.per_epoch
    if start_step < 0 or (total is not None and start_step > total):
        raise ValueError(f"start_step must lie in [0, {total}]; got {start_step}.")
    steps = grain.MapDataset.range(start_step, total if total is not None else 2**62)
    ds = steps.map(fn).to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    return iter(ds)


def eval_batches(data: InMemory | OnDisk, *, batch_size: int) -> Iterator[Batch]:
    """Every example once, in order; the last batch is padded and ``mask`` marks real rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    n = len(data)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        images, labels = data.read(idx)
        pad = batch_size - len(idx)
        mask = np.ones(batch_size, bool)
        if pad:
            mask[len(idx) :] = False
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
            idx = np.concatenate([idx, np.zeros(pad, idx.dtype)])
        yield {"image": images, "label": labels, "index": idx.astype(np.int64), "mask": mask}


@dataclasses.dataclass(frozen=True)
class Subset:
    """Examples ``indices`` of another split (a validation split carved from train)."""

    data: InMemory | OnDisk
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.data.read(self.indices[np.asarray(indices)])


def labels_of(data: InMemory | OnDisk | Subset) -> np.ndarray:
    """All labels of a split, in order."""
    if isinstance(data, InMemory):
        return data.labels
    return np.concatenate([data.read(np.arange(i, min(i + 8192, len(data))))[1] for i in range(0, len(data), 8192)])


def stratified_split(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, val_indices)``: ``fraction`` of every class (at least one example of
    each class with two or more) goes to validation, chosen by ``seed``; both sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must lie in (0, 1); got {fraction}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        n_val = int(round(fraction * len(idx)))
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.append(rng.permutation(idx)[:n_val])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    if len(val) == 0:
        raise ValueError("the validation split would be empty; use a larger fraction or more data.")
    return train, val
