"""The fit loop and checkpoints: resume exactly, survive SIGKILL and corruption, stop on NaN."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd.data import pipeline as P
from jkd.models import create_model
from jkd.train import SGDConfig, create_train_state, make_optimizer, objectives, parallel
from jkd.train.checkpoint import Checkpoints, IncompatibleCheckpointError, abstract_like, load_frozen, save_frozen
from jkd.train.optim import _strict_safe
from jkd.train.loop import LoopConfig, NonFiniteError, RunInterrupted, _check_finite, _Progress, fit
from tests.train import helpers as H
from tests.train.killable_run import dataset

ROOT = Path(__file__).resolve().parents[2]


def _fit(ckpt_dir, num_steps, optimizer=None, runner=None, save_every=4):
    data = dataset()
    tg, teacher = H.teacher()
    g, state = H.student(optimizer=optimizer)
    run = (
        runner(g, tg) if runner else parallel.single_device(H.step_fn(g, tg, view_fn=H.CROP_FLIP, optimizer=optimizer))
    )
    ckpts = Checkpoints(ckpt_dir) if ckpt_dir is not None else None
    try:
        return fit(
            run,
            state,
            objectives.SoftKD(),
            teacher,
            batches=lambda s: P.train_batches(data, batch_size=16, seed=3, start_step=s),
            checkpoints=ckpts,
            config=LoopConfig(num_steps=num_steps, save_every=save_every, sync_every=2, progress=False),
        )
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


def _steps(ckpt):
    return [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []


def _kill_when(cmd, env, ckpt, ready, log):
    """Start a run, SIGKILL it once ``ready()`` holds; return the step it said it resumed from."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out)
        deadline = time.time() + 240
        while time.time() < deadline and not ready() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    said = [int(line.split()[1]) for line in Path(log).read_text().splitlines() if line.startswith("resumed")]
    return said[0] if said else 0


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume(tmp_path):
    """Killed twice (once while an asynchronous save is being written), each rerun resumes
    from the newest complete checkpoint, which it says, and the end equals an uninterrupted run."""
    ref = tmp_path / "ref.npz"
    cmd = [sys.executable, "-m", "tests.train.killable_run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd + [str(tmp_path / "ref_ckpt"), str(ref)], check=True, cwd=ROOT, env=env, timeout=300)
    ckpt = tmp_path / "ckpt"
    never = tmp_path / "never.npz"
    run = cmd + [str(ckpt), str(never), "0.15"]
    # 1. during a save: an unfinished (temporary) step folder exists.
    saving = lambda: bool(ckpt.exists() and any("tmp" in p.name for p in ckpt.iterdir()) and _steps(ckpt))  # noqa: E731
    assert _kill_when(run, env, ckpt, saving, tmp_path / "1.log") == 0
    first = max(_steps(ckpt))
    # 2. mid-run, once a few more checkpoints exist.
    resumed = _kill_when(run, env, ckpt, lambda: max(_steps(ckpt)) >= first + 8, tmp_path / "2.log")
    assert resumed == first, "the second run did not resume from the first run's newest checkpoint"
    assert not never.exists(), "the run finished before it was killed"
    second = max(_steps(ckpt))
    out = tmp_path / "resumed.npz"
    done = subprocess.run(
        cmd + [str(ckpt), str(out)], check=True, cwd=ROOT, env=env, timeout=300, capture_output=True, text=True
    )
    assert f"resumed {second}" in done.stdout and second >= first + 8
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
    with pytest.warns(RuntimeWarning, match="step 8 .* could not be restored.*moved to"):
        state, meta = ckpts.restore(abstract_like(template))
    assert meta["data_position"] == 4 and int(state.step) == 4
    # Set aside for inspection, out of the way of the run that writes step 8 again.
    assert ckpts.steps() == [4] and (ckpts.unreadable_directory / "8" / "state").is_dir()
    ckpts.close()


def test_in_a_run_of_several_processes_only_process_0_sets_a_corrupt_step_aside(tmp_path, monkeypatch):
    _fit(tmp_path, 8, save_every=4)
    for f in (tmp_path / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    g, template = H.student()
    ckpts = Checkpoints(tmp_path)
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # another process finds the same corrupt step
    with pytest.warns(RuntimeWarning, match="step 8 .* could not be restored"):
        _, meta = ckpts.restore(abstract_like(template))
    assert meta["data_position"] == 4 and (tmp_path / "8").is_dir()  # it falls back, and leaves the move to process 0
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="step 8 .* could not be restored.*moved to"):
        ckpts.restore(abstract_like(template))
    assert not (tmp_path / "8").exists() and (ckpts.unreadable_directory / "8").is_dir()
    ckpts.close()


def test_a_run_with_a_corrupt_newest_checkpoint_finishes(tmp_path):
    """Once blocked for good: the rerun reached the corrupt step again and orbax refused to
    overwrite it ("Checkpoint for step 8 already exists")."""
    reference, _ = _fit(None, 12, save_every=4)
    ckpt = tmp_path / "ckpt"
    _fit(ckpt, 8, save_every=4)
    victim = max((f for f in (ckpt / "8" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    with pytest.warns(RuntimeWarning, match="step 8"):
        state, history = _fit(ckpt, 12, save_every=4)
    assert history[0] == {"event": "resumed", "step": 4}
    assert H.max_abs_diff(reference.params, state.params) == 0.0
    ckpts = Checkpoints(ckpt)
    assert ckpts.steps() == [8, 12] and (tmp_path / "ckpt_unreadable" / "8").is_dir()
    ckpts.close()


def test_a_checkpoint_of_another_model_is_refused_not_skipped(tmp_path):
    _fit(tmp_path, 4, save_every=4)
    ckpts = Checkpoints(tmp_path)
    wider = create_model("cnn", num_classes=4, input_shape=H.SHAPE, seed=1, width=6)
    _, other = create_train_state(wider, H.tx(), seed=0)
    with pytest.raises(
        IncompatibleCheckpointError,
        match=r"shapes differ: params\.bn1\.bias\.value: saved \(4,\), config \(6,\);.*\(\+14 more\)",
    ):
        ckpts.restore(abstract_like(other))
    assert ckpts.steps() == [4] and not ckpts.unreadable_directory.exists()  # nothing was moved
    ckpts.close()


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    huge = make_optimizer(SGDConfig(learning_rate=1e30, decay_epochs=()), steps_per_epoch=1, total_steps=1)
    with pytest.raises(NonFiniteError, match=r"step \d+.*learning rate.*temperature"):
        _fit(tmp_path, 40, optimizer=huge, save_every=1)
    ckpts = Checkpoints(tmp_path)
    g, template = H.student(optimizer=huge)
    restored = ckpts.restore(abstract_like(template))
    # The first update (lr 1e30) is still finite and saved; the loss of the next is not.
    assert restored is not None and restored[1]["data_position"] < 40
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored[0].params))
    ckpts.close()


def _overflow_at(step: int):
    """SGD whose update number ``step`` (1-based) overflows float32: the loss and the gradient
    of that step are finite (computed before the update), the updated parameters are not."""
    return _strict_safe(optax.sgd(lambda count: jnp.where(count < step - 1, jnp.float32(0.01), jnp.float32(jnp.inf))))


def test_an_update_that_overflows_is_never_saved(tmp_path):
    with pytest.raises(NonFiniteError, match="update at step 8 made the model's parameters"):
        _fit(tmp_path, 12, optimizer=_overflow_at(8), save_every=4)
    ckpts = Checkpoints(tmp_path)
    assert ckpts.steps() == [4]  # the last good step stays the newest
    g, template = H.student(optimizer=_overflow_at(8))
    state, meta = ckpts.restore(abstract_like(template))
    assert meta["data_position"] == 4
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((state.params, state.opt_state)))
    ckpts.close()
    # --resume works: with the cause fixed (a sane learning rate), the run continues from step 4.
    state, history = _fit(tmp_path, 12, optimizer=_overflow_at(100), save_every=4)
    assert history[0] == {"event": "resumed", "step": 4} and int(state.step) == 12


def test_non_finite_metrics_of_many_students_are_explained():
    """Several students give metric arrays; float() on them once hid the helpful error."""
    with pytest.raises(NonFiniteError, match=r"loss non-finite for students \[1\] of 3.*learning rate"):
        _check_finite(7, {"loss": np.array([0.5, np.nan, 0.4]), "grad_norm": np.ones(3)})
    with pytest.raises(NonFiniteError, match=r"step 7.*grad_norm inf"):
        _check_finite(7, {"loss": np.float32(1.0), "grad_norm": np.float32(np.inf)})
    _check_finite(7, {"loss": np.ones(3), "grad_norm": np.ones(3), "accuracy": np.full(3, np.nan)})


def test_ctrl_c_finishes_the_save_in_flight_and_says_where_it_stopped(tmp_path):
    data = dataset()
    tg, teacher = H.teacher()
    g, state = H.student()
    run = parallel.single_device(H.step_fn(g, tg))

    def batches(start):
        for i, b in enumerate(P.train_batches(data, batch_size=16, seed=3, start_step=start)):
            if start + i == 10:
                raise KeyboardInterrupt
            yield b

    ckpts = Checkpoints(tmp_path)
    with pytest.raises(RunInterrupted) as e:
        fit(
            run,
            state,
            objectives.SoftKD(),
            teacher,
            batches=batches,
            checkpoints=ckpts,
            config=LoopConfig(num_steps=20, save_every=4, sync_every=2, progress=False),
        )
    assert (e.value.step, e.value.saved_step) == (10, 8) and "interrupted at step 10" in str(e.value)
    assert ckpts.steps() == [4, 8]
    ckpts.close()


def test_progress_without_a_terminal_writes_short_lines():
    """`make demo > demo.log` once wrote every bar refresh (carriage returns) into the file."""
    import io

    out = io.StringIO()
    bar = _Progress(total=100, initial=0, label="student", every_s=3600.0, stream=out)
    for step in range(1, 101):
        bar.update(step, loss=1.0 / step, rate=1000.0)
    bar.close()
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == ["student: step 100/100 (100%), loss 0.0100, 1000 img/s"]
    out = io.StringIO()
    bar = _Progress(total=3, initial=0, label="", every_s=0.0, stream=out)
    for step in (1, 2, 3):
        bar.update(step, loss=0.5, rate=10.0)
    assert out.getvalue().splitlines()[0] == "step 1/3 (33%), loss 0.5000, 10 img/s"


def test_the_two_latest_checkpoints_are_kept(tmp_path):
    g, state = H.student()
    ckpts = Checkpoints(tmp_path)
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.6), (4, None)]:  # metrics choose nothing
        ckpts.save(step, state, meta={"data_position": step, **({"val_accuracy": acc} if acc else {})})
    ckpts.wait()
    assert ckpts.steps() == [3, 4] and ckpts.meta(3)["val_accuracy"] == 0.6
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


def test_the_logged_rate_names_its_unit_and_language_model_rows_count_tokens():
    """An LM run logged ``images_per_s`` for its rows; now sequences (or rows) and tokens per second."""
    mask = np.zeros((4, 2, 8), bool)  # 4 rows, 2 vmapped students, 8 slots
    mask[:, 0, :5] = mask[:, 1, :3] = True  # the students' rows hold 5 and 3 tokens: 4 per row per student

    def batches(start):
        while True:
            yield {"tokens": np.zeros((4, 2, 8), np.int32), "attention_mask": mask}

    def run(state, batch, objective, teacher):
        return state + 1, {"loss": jnp.float32(0.5)}

    _, history = fit(
        run,
        jnp.float32(0),
        None,
        None,
        batches=batches,
        config=LoopConfig(num_steps=2, sync_every=2, progress=False, unit="seq"),
    )
    rec = next(r for r in history if r.get("event") == "train")
    assert "images_per_s" not in rec and rec["sequences_per_s"] > 0
    # over the same seconds: 4 tokens per sequence and per student (5 and 3 in the two students' rows)
    assert rec["tokens_per_s"] / rec["sequences_per_s"] == pytest.approx(4.0)


def test_a_batch_made_from_the_state_sees_the_state_of_its_step(tmp_path):
    """On-policy batches: ``batch(state)`` is called with the state the step trains, also after a resume."""
    data = dataset()
    tg, teacher = H.teacher()
    seen = []

    def batches(start):
        for b in P.train_batches(data, batch_size=16, seed=3, start_step=start):

            def made(state, b=b):
                seen.append(int(state.step))
                return b

            yield made

    def go(steps):
        g, state = H.student()
        run = parallel.single_device(H.step_fn(g, tg, view_fn=H.CROP_FLIP))
        ckpts = Checkpoints(tmp_path)
        try:
            return fit(
                run,
                state,
                objectives.SoftKD(),
                teacher,
                batches=batches,
                checkpoints=ckpts,
                config=LoopConfig(num_steps=steps, save_every=3, sync_every=2, progress=False),
            )
        finally:
            ckpts.close()

    go(3)
    go(5)
    assert seen == [0, 1, 2, 3, 4]
