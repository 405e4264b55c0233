"""One run at a time in a run folder: the lock, its holder named, a dead holder's lock taken over;
and the fingerprints that make a replaced input another configuration."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jkd.runtime import fingerprint as F
from jkd.runtime.run_folder import ConfigMismatchError, RunFolder
from jkd.runtime.run_lock import LOCK_FILE, RunFolderBusy, RunLock

ROOT = Path(__file__).resolve().parents[1]


def hold(folder: Path):
    """Another process that holds ``folder``'s lock until killed (it imports jkd.runtime.run_lock only)."""
    code = (
        "import sys, time; from jkd.runtime.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def held(tmp_path):
    folder = tmp_path / "run"
    proc = hold(folder)
    yield folder, proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(held):
    folder, proc = held
    with pytest.raises(RunFolderBusy) as e:
        RunFolder(folder, {"a": 1})
    assert f"process {proc.pid} on host {socket.gethostname()}" in str(e.value)
    assert "choose another --run-dir" in str(e.value)


def test_a_killed_holders_lock_is_taken_over_with_a_line(held):
    folder, proc = held
    proc.kill()  # SIGKILL: no clean-up, the lock file stays behind
    proc.wait()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == proc.pid
    lines = []
    rf = RunFolder(folder, {"a": 1}, echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith(
        f"{folder}: taking over the lock left by process {proc.pid} on host {socket.gethostname()} (started "
    )
    assert lines[0].endswith("which is no longer running.")
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    rf.close()
    assert list(folder.iterdir()) == []  # released: the lock file is gone


def test_a_lock_from_another_host_counts_while_its_heartbeat_is_fresh(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"host": "tpu-host-7", "pid": 4242, "started": "2026-12-01T00:00:00"}))
    with pytest.raises(RunFolderBusy, match="process 4242 on host tpu-host-7"):
        RunLock(folder).acquire()
    old = time.time() - 600  # no heartbeat for 10 minutes: that host's run is gone
    os.utime(folder / LOCK_FILE, (old, old))
    lines = []
    with RunLock(folder, echo=lines.append):
        assert "process 4242 on host tpu-host-7" in lines[0] and "no longer running" in lines[0]


def test_force_keeps_the_lock_and_a_closed_folder_can_be_claimed_again(tmp_path):
    folder = tmp_path / "run"
    first = RunFolder(folder, {"a": 1})
    first.begin()
    first.mark_started()
    (folder / "ckpt").mkdir()
    first.close()
    assert not (folder / LOCK_FILE).exists()  # released
    forced = RunFolder(folder, {"a": 2}, force=True)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # the old run deleted, the lock still held
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from jkd.runtime.run_lock import RunLock; RunLock(sys.argv[1]).acquire()",
            str(folder),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert other.returncode == 1 and f"process {os.getpid()} on host" in other.stderr
    forced.close()


def test_evaluation_keys_may_change_on_resume_and_training_keys_may_not(tmp_path):
    folder = tmp_path / "run"
    rf = RunFolder(folder, {"steps": 3, "test_file": "a.jsonl", "file_digests": {"test_file": "1", "train_file": "9"}})
    rf.begin()
    rf.mark_started()
    rf.close()
    new = {"steps": 3, "test_file": "b.jsonl", "file_digests": {"test_file": "2", "train_file": "9"}}
    reusable = ("test_file", "file_digests.test_file")
    again = RunFolder(folder, new, resume=True, reusable=reusable)
    assert again.changed == ['file_digests.test_file: "1" -> "2"', 'test_file: "a.jsonl" -> "b.jsonl"']
    again.begin()
    again.close()
    assert json.loads((folder / "config.json").read_text())["test_file"] == "b.jsonl"  # recorded
    with pytest.raises(FileExistsError, match="pass --resume"):
        RunFolder(folder, new, reusable=reusable)
    with pytest.raises(ConfigMismatchError, match=r"train_file: its contents changed \(fingerprint \"9\" -> \"8\"\)"):
        RunFolder(
            folder, {**new, "file_digests": {"test_file": "2", "train_file": "8"}}, resume=True, reusable=reusable
        )


def test_fingerprints_see_a_file_replaced_in_place_and_ignore_a_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "FULL_HASH_BYTES", 1 << 16)  # make a 4 MiB file "large": sampled, not read whole
    rng = np.random.default_rng(0)
    a = tmp_path / "teacher"
    a.mkdir()
    weights = rng.standard_normal(1 << 20).astype(np.float32)
    (a / "model.safetensors").write_bytes(weights.tobytes())
    (a / "config.json").write_text('{"hidden_size": 8}')
    before = F.input_fingerprint(a)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in a.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    assert F.input_fingerprint(copy) == before  # names and contents, not times or places
    retrained = weights + np.float32(1e-3) * rng.standard_normal(weights.shape).astype(np.float32)
    (a / "model.safetensors").write_bytes(retrained.tobytes())  # the same size, other values
    assert F.input_fingerprint(a) != before
    (a / "config.json").write_text('{"hidden_size": 9}')
    assert F.input_fingerprint(tmp_path / "missing") is None


def test_an_image_runs_teacher_and_dataset_join_the_guard(tmp_path):
    from jkd.jobs.image import ExperimentConfig, guarded_inputs
    from jkd.runtime.run_folder import guarded_config

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "state").write_bytes(b"weights v1")
    data = tmp_path / "data.npz"
    data.write_bytes(b"npz v1")
    cfg = ExperimentConfig(dataset=str(data), teacher_dir=str(teacher))
    first = guarded_config(cfg, guarded_inputs(cfg))
    assert set(first["file_digests"]) == {"dataset", "teacher_dir"}
    (teacher / "state").write_bytes(b"weights v2")
    rf = RunFolder(tmp_path / "run", first)
    rf.begin()
    rf.mark_started()
    rf.close()
    with pytest.raises(ConfigMismatchError, match="teacher_dir: its contents changed"):
        RunFolder(tmp_path / "run", guarded_config(cfg, guarded_inputs(cfg)), resume=True)
