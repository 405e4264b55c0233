"""What the jobs share: seeds' means and spreads, the verdict's margin, one atomic write."""

import errno
import os

import pytest

from jkd.runtime.atomic import atomic_write
from jkd.runtime.faults import DiskFullError
from jkd.jobs.seeds import margin_and_spread, mean_std, verdict


def test_mean_and_population_std_over_seeds_by_hand():
    per_seed = [
        {"acc": 0.5, "ce": 2.0, "speed": None, "name": "a"},
        {"acc": 0.7, "ce": 1.0, "speed": 3.0, "name": "b"},
        {"acc": 0.9, "ce": 3.0, "speed": 5.0, "name": "c"},
    ]
    got = mean_std(per_seed)
    assert set(got) == {"seed_count", "acc_mean", "acc_std", "ce_mean", "ce_std"}  # None for one seed: left out
    assert got["seed_count"] == 3
    assert got["acc_mean"] == pytest.approx(0.7) and got["ce_mean"] == pytest.approx(2.0)
    assert got["acc_std"] == pytest.approx((0.08 / 3) ** 0.5)  # sqrt(((-.2)^2 + 0 + .2^2) / 3)
    assert got["ce_std"] == pytest.approx((2 / 3) ** 0.5)


def test_margin_and_spread():
    a = {"acc_mean": 0.80, "acc_std": 0.01, "ce_mean": 1.0, "ce_std": 0.2}
    b = {"acc_mean": 0.75, "acc_std": 0.03, "ce_mean": 1.1, "ce_std": 0.05}
    margin, spread = margin_and_spread(a, b, "acc")
    assert margin == pytest.approx(0.05) and spread == 0.03  # a beats b: 0.05 > 0.03
    margin, spread = margin_and_spread(a, b, "ce", better=-1)  # lower is better
    assert margin == pytest.approx(0.1) and spread == 0.2  # within the spread: no verdict of a win
    assert margin_and_spread(a, {"x_mean": 1}, "acc") is None


def test_one_seed_gives_no_verdict():
    """With one seed the spread is 0, not unknown-but-small: the sentence gives the margin and says
    that there is no spread to judge it by, never "beats"."""
    one = {"name": "kd", **mean_std([{"acc": 0.52}])}
    alone = {"name": "alone", **mean_std([{"acc": 0.50}])}
    sentence = verdict(one, alone, "acc", label="accuracy")
    assert "beat" not in sentence and "no seed spread" in sentence and "0.5200 vs 0.5000" in sentence
    three = {"name": "kd", **mean_std([{"acc": x} for x in (0.52, 0.53, 0.54)])}
    alones = {"name": "alone", **mean_std([{"acc": x} for x in (0.50, 0.50, 0.50)])}
    assert verdict(three, alones, "acc", label="accuracy").startswith("kd beats alone on accuracy")


def test_an_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("killed mid-write"))))
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DiskFullError, match=f"disk full while writing summary.json in {tmp_path}"):
        atomic_write(path, "newer")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
