"""The fit loop and checkpoints: resume exactly, survive SIGKILL and corruption, stop on NaN."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jkd.data import pipeline as P
from jkd.train import SGDConfig, make_optimizer, objectives, parallel
from jkd.train.checkpoint import Checkpoints, abstract_like, load_frozen, save_frozen
from jkd.train.loop import LoopConfig, NonFiniteError, fit
from tests.train import helpers as H
from tests.train.killable_run import dataset

ROOT = Path(__file__).resolve().parents[2]


def _fit(ckpt_dir, num_steps, optimizer=None, runner=None, save_every=4):
    data = dataset()
    tg, teacher = H.teacher()
    g, state = H.student(optimizer=optimizer)
    run = runner(g, tg) if runner else parallel.single_device(H.step_fn(g, tg, view_fn=H.CROP_FLIP, optimizer=optimizer))
    ckpts = Checkpoints(ckpt_dir) if ckpt_dir is not None else None
    try:
        return fit(run, state, objectives.SoftKD(), teacher,
                   batches=lambda s: P.train_batches(data, batch_size=16, seed=3, start_step=s),
                   checkpoints=ckpts, config=LoopConfig(num_steps=num_steps, save_every=save_every, sync_every=2, progress=False))
    finally:
        if ckpts is not None:
            ckpts.close()


def test_same_seed_same_parameters_and_metrics():
    (a, ha), (b, hb) = _fit(None, 12), _fit(None, 12)
    assert H.max_abs_diff(a.params, b.params) == 0.0
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]


def test_stop_and_resume_gives_the_uninterrupted_parameters(tmp_path):
    full, _ = _fit(None, 20)
    _fit(tmp_path, 10)  # a run that ends at step 10
    resumed, history = _fit(tmp_path, 20)
    assert history[0] == {"event": "resumed", "step": 10}
    assert H.max_abs_diff(full.params, resumed.params) == 0.0
    assert H.max_abs_diff(full.opt_state, resumed.opt_state) == 0.0


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume(tmp_path):
    ref = tmp_path / "ref.npz"
    cmd = [sys.executable, "-m", "tests.train.killable_run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd + [str(tmp_path / "ref_ckpt"), str(ref)], check=True, cwd=ROOT, env=env, timeout=300)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(cmd + [str(ckpt), str(tmp_path / "never.npz"), "0.15"], cwd=ROOT, env=env)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once a few checkpoints exist, mid-run
        steps = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
        if steps and max(steps) >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "never.npz").exists(), "the run finished before it was killed"
    out = tmp_path / "resumed.npz"
    subprocess.run(cmd + [str(ckpt), str(out)], check=True, cwd=ROOT, env=env, timeout=300)
    a, b = np.load(ref), np.load(out)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    _fit(tmp_path, 8, save_every=4)
    ckpts = Checkpoints(tmp_path)
    assert ckpts.steps() == [4, 8]
    for f in (tmp_path / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    g, template = H.student()
    with pytest.warns(RuntimeWarning, match="step 8 .* could not be restored"):
        state, meta = ckpts.restore(abstract_like(template))
    assert meta["data_position"] == 4 and int(state.step) == 4
    ckpts.close()


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    huge = make_optimizer(SGDConfig(learning_rate=1e30, decay_epochs=()), steps_per_epoch=1, total_steps=1)
    with pytest.raises(NonFiniteError, match=r"step \d+.*learning rate.*temperature"):
        _fit(tmp_path, 40, optimizer=huge, save_every=1)
    ckpts = Checkpoints(tmp_path)
    g, template = H.student(optimizer=huge)
    restored = ckpts.restore(abstract_like(template))
    if restored is not None:  # every saved state is finite
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored[0].params))
    ckpts.close()


def test_best_checkpoint_is_kept_with_the_latest(tmp_path):
    g, state = H.student()
    ckpts = Checkpoints(tmp_path)
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.6), (4, None)]:  # 1: neither best nor latest
        ckpts.save(step, state, meta={"data_position": step, **({"val_accuracy": acc} if acc else {})})
    ckpts.wait()
    assert ckpts.steps() == [2, 3, 4] and ckpts.best_step() == 2  # the best and the 2 latest
    ckpts.close()


def test_restore_into_a_different_device_count(tmp_path):
    mesh4 = parallel.data_mesh(4)
    _fit(tmp_path, 8, runner=lambda g, tg: parallel.on_mesh(H.step_fn(g, tg, view_fn=H.CROP_FLIP), mesh4))
    from jax.sharding import NamedSharding, PartitionSpec

    mesh2 = parallel.data_mesh(2)
    g, template = H.student()
    ckpts = Checkpoints(tmp_path)
    state, meta = ckpts.restore(abstract_like(template, NamedSharding(mesh2, PartitionSpec())))
    ckpts.close()
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == 2 and meta["data_position"] == 8
    # And training continues on 2 devices.
    tg, teacher = H.teacher()
    run = parallel.on_mesh(H.step_fn(g, tg, view_fn=H.CROP_FLIP), mesh2)
    state, m = run(state, H.batches(1)[0], objectives.SoftKD(), teacher)
    assert int(state.step) == 9 and np.isfinite(float(m["loss"]))


def test_teacher_is_saved_once_apart(tmp_path):
    tg, teacher = H.teacher()
    save_frozen(tmp_path / "teacher", teacher, {"model": "cnn"})
    with pytest.raises(FileExistsError, match="written once"):
        save_frozen(tmp_path / "teacher", teacher, {"model": "cnn"})
    variables, meta = load_frozen(tmp_path / "teacher", abstract_like(teacher))
    assert meta == {"model": "cnn"} and H.max_abs_diff(variables, teacher) == 0.0
