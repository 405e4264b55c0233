"""Deterministic shuffling, epochs, resume, per-process sharding, eval padding."""

import numpy as np
import pytest

from jkd.data import pipeline as P


def _toy(n=50):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
    return P.InMemory(images, (np.arange(n) % 7).astype(np.int32))


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_same_seed_same_batches_different_seed_different():
    a = _take(P.train_batches(_toy(), batch_size=8, seed=3), 10)
    b = _take(P.train_batches(_toy(), batch_size=8, seed=3), 10)
    c = _take(P.train_batches(_toy(), batch_size=8, seed=4), 10)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["index"], y["index"])
    assert any(not np.array_equal(x["index"], z["index"]) for x, z in zip(a, c))


def test_each_epoch_is_a_fresh_permutation_without_repeats():
    data = _toy(50)
    batches = list(P.train_batches(data, batch_size=8, seed=0, num_epochs=3))
    assert len(batches) == 3 * (50 // 8)
    epochs = [np.concatenate([b["index"] for b in batches[e * 6 : (e + 1) * 6]]) for e in range(3)]
    for e in epochs:
        assert len(set(e.tolist())) == 48  # no example twice within an epoch (2 dropped)
    assert not np.array_equal(epochs[0], epochs[1])
    # Records match their indices: image value == index, label == index % 7.
    for b in batches:
        np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["index"])
        np.testing.assert_array_equal(b["label"], b["index"] % 7)


def test_resume_from_step_continues_exactly():
    full = list(P.train_batches(_toy(), batch_size=8, seed=1, num_epochs=4))
    resumed = list(P.train_batches(_toy(), batch_size=8, seed=1, num_epochs=4, start_step=9))
    assert len(resumed) == len(full) - 9
    for x, y in zip(full[9:], resumed):
        np.testing.assert_array_equal(x["index"], y["index"])


def test_processes_split_each_global_batch():
    glob = _take(P.train_batches(_toy(), batch_size=8, seed=2), 5)
    parts = [
        _take(P.train_batches(_toy(), batch_size=8, seed=2, process_index=i, process_count=2), 5) for i in range(2)
    ]
    for g, p0, p1 in zip(glob, *parts):
        assert len(p0["index"]) == 4
        np.testing.assert_array_equal(np.concatenate([p0["index"], p1["index"]]), g["index"])


def test_on_disk_and_in_memory_give_the_same_stream(embedded):
    src = embedded.split("test")
    mem, disk = P.to_memory(src), P.OnDisk(src)
    for a, b in zip(
        _take(P.train_batches(mem, batch_size=32, seed=5), 4), _take(P.train_batches(disk, batch_size=32, seed=5), 4)
    ):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_eval_batches_cover_everything_once_with_a_mask():
    batches = list(P.eval_batches(_toy(50), batch_size=16))
    assert [b["mask"].sum() for b in batches] == [16, 16, 16, 2]
    idx = np.concatenate([b["index"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(idx, np.arange(50))
    assert all(b["image"].shape == (16, 2, 2, 1) for b in batches)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=10, seed=0, process_count=4), "divisible by the process count 4"),
        (dict(batch_size=0, seed=0), "batch_size must be >= 1"),
        (dict(batch_size=64, seed=0), "exceeds the split's 50 examples"),
        (dict(batch_size=8, seed=0, process_index=2, process_count=2), r"process_index must lie in \[0, 2\)"),
        (dict(batch_size=8, seed=0, num_epochs=1, start_step=7), r"start_step must lie in \[0, 6\]"),
    ],
)
def test_bad_pipeline_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.train_batches(_toy(50), **kwargs)


def test_stratified_validation_split():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    tr, va = P.stratified_split(labels, fraction=0.1, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 100
    np.testing.assert_array_equal(np.bincount(labels[va]), [1, 2, 3, 4])  # 10% of every class
    tr2, va2 = P.stratified_split(labels, fraction=0.1, seed=0)
    np.testing.assert_array_equal(va, va2)  # seeded
    assert not np.array_equal(va, P.stratified_split(labels, fraction=0.1, seed=1)[1])
    data = P.InMemory(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), labels.astype(np.int32))
    sub = P.Subset(data, va)
    x, y = sub.read(np.arange(len(sub)))
    np.testing.assert_array_equal(x[:, 0, 0, 0], va)
    np.testing.assert_array_equal(P.labels_of(sub), labels[va])
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\)"):
        P.stratified_split(labels, fraction=0.0, seed=0)
