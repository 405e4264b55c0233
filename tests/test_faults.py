"""Faults and bad input, tried as a new user would (issue: "Faults and bad input").

Each test failed on the code before that issue: a hang, a silent wrong result, a traceback
or a misleading message. `M` is the tiny teacher every CLI case here trains.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jkd import cli
from jkd.data import load_dataset, user

ROOT = Path(__file__).resolve().parents[1]
M = ["--model", "mlp", "--model-option", "hidden=(16,)", "--epochs", "1", "--no-progress"]


def _err(capsys) -> str:
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny saved teacher for the `distill` cases (its own module-scoped folder, read only)."""
    run = tmp_path_factory.mktemp("faults_teacher") / "run"
    assert cli.main(["train-teacher", *M, "--run-dir", str(run)]) == 0
    return run / "teacher" / "model"


def _npz(path, x_train, y_train, x_test=None, y_test=None):
    np.savez(
        path,
        x_train=x_train,
        y_train=y_train,
        x_test=x_train[:8] if x_test is None else x_test,
        y_test=y_train[:8] if y_test is None else y_test,
    )
    return path


def _images(n=40, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return rng.random((n, 8, 8)).astype(np.float32), y


# ---- 1. a full disk stops the run with one message, never a hang ----------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_within_seconds_and_resume_continues_once_space_is_freed(tmp_path):
    disk = tmp_path / "tiny"
    if not _mount_tmpfs(disk, "1200k"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); the simulated ENOSPC tests still run")
    try:
        data = tmp_path / "tfds"
        cmd = [
            sys.executable,
            "-m",
            "jkd.cli",
            "train-teacher",
            "--model",
            "mlp",
            "--model-option",
            "hidden=(64,)",
            "--epochs",
            "6",
            "--no-progress",
            "--run-dir",
            str(disk / "run"),
            "--data-dir",
            str(data),
        ]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
        # Before: tensorboardX's writer thread died and the main thread waited forever.
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert first.returncode == 2, first.stderr[-2000:]
        lines = [ln for ln in first.stderr.splitlines() if ln.startswith("jkd train-teacher: error")]
        assert len(lines) == 1 and "disk full" in lines[0] and "--resume" in lines[0], first.stderr[-2000:]
        # No traceback of jkd's. (orbax's tensorstore callbacks may still print "Event loop is
        # closed" from their own threads once its writer failed: BUILD_NOTES, "Measuring on this machine".)
        assert str(ROOT / "jkd") not in first.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
        assert second.returncode == 0, second.stderr[-2000:]
        resumed = [ln for ln in second.stdout.splitlines() if "resumed from the checkpoint of step" in ln]
        assert resumed and int(resumed[0].rsplit(" ", 1)[1]) > 0, second.stdout  # not from scratch
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_while_logging_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from jkd.runtime import run_folder

    calls = {"n": 0}
    real = run_folder._EventWriter.scalars

    def scalars(self, record):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, record)

    monkeypatch.setattr(run_folder._EventWriter, "scalars", scalars)
    assert cli.main(["train-teacher", *M, "--run-dir", str(tmp_path / "run")]) == 2
    err = _err(capsys)
    assert "disk full while writing the log in" in err and "free" in err and "--resume" in err


def test_a_full_disk_while_saving_a_checkpoint_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import orbax.checkpoint as ocp

    def save(self, *a, **k):  # how orbax's writer threads report ENOSPC
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database: No space left on device')

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert cli.main(["train-teacher", *M, "--run-dir", str(tmp_path / "run")]) == 2
    err = _err(capsys)
    assert "disk full while saving checkpoints (step 31 or the one before)" in err and "this run needs about" in err
    assert "Traceback" not in err


def test_a_bare_enospc_from_any_write_still_says_disk_full_and_resume(tmp_path, monkeypatch, capsys):
    """A plain OSError(ENOSPC) from a write jkd does not wrap itself (here: saving the trained
    teacher) reaches the CLI as the same one line (CI once printed a bare 'No space left')."""
    from jkd.jobs import image as experiment

    def save_frozen(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(experiment, "save_frozen", save_frozen)
    assert cli.main(["train-teacher", *M, "--run-dir", str(tmp_path / "run")]) == 2
    err = _err(capsys)
    assert "disk full while writing in" in err and "free" in err and "--resume" in err


# ---- 2. NaN pixels are refused like inf ----------------------------------------------------


def test_nan_pixels_are_refused_naming_the_split_and_count(tmp_path):
    x, y = _images()
    x[3, 2, 2] = np.nan
    x[5, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"x_train holds 2 NaN or infinite pixel value\(s\) of 2560"):
        load_dataset(_npz(tmp_path / "nan.npz", x, y), data_dir=tmp_path / "tfds")
    x, y = _images()
    x[:] = np.nan
    with pytest.raises(ValueError, match="x_train holds 2560 NaN"):
        user.validate({"train": (x, y)})


# ---- 4. the NaN check explains instead of crashing -----------------------------------------


@pytest.mark.slow
def test_an_exploding_run_of_several_students_says_why(teacher_dir, tmp_path, capsys):
    argv = [
        "distill",
        "--teacher-dir",
        str(teacher_dir),
        *M,
        "--seeds",
        "0,1",
        "--no-baseline",
        "--optimizer",
        "sgd",
        "--lr",
        "1e6",
        "--run-dir",
        str(tmp_path / "d"),
    ]
    assert cli.main(argv) == 2
    err = _err(capsys)
    assert "non-finite values at step" in err and "learning rate" in err, err


# ---- 5. a failed start never blocks the fixed rerun ----------------------------------------


@pytest.mark.slow
def test_a_failed_start_does_not_block_the_corrected_command(tmp_path, capsys):
    folder = tmp_path / "imgs"
    from PIL import Image

    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(folder / c / f"{i}.png")
    (folder / "a" / "bad.png").write_text("not an image")
    run = str(tmp_path / "run")
    base = [
        "train-teacher",
        *M,
        "--batch-size",
        "4",
        "--dataset",
        str(folder),
        "--data-dir",
        str(tmp_path / "tfds"),
        "--run-dir",
        run,
    ]
    assert cli.main(base) == 2
    assert "cannot read the image" in _err(capsys)
    (folder / "a" / "bad.png").unlink()
    assert cli.main([*base, "--lr", "-1"]) == 2
    assert "learning_rate (--lr) must be a finite number > 0; got -1" in _err(capsys)
    assert cli.main(base) == 0  # neither failure left a folder that refuses this
    # Once training has begun, another configuration is refused, naming what differs.
    assert cli.main([*base[:-2], "--epochs", "2", "--run-dir", run]) == 2
    assert "teacher_epochs (--epochs): 1 -> 2" in _err(capsys)


# ---- 6. clear errors for bad files, read-only folders and Ctrl-C ---------------------------


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_images_name_the_file(tmp_path, content):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / c / f"{i}.png")
    bad = tmp_path / "b" / "3.png"
    if content == "truncated":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read the image {bad}"):
        user.read_image_folder(tmp_path)


def test_a_read_only_run_folder_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        assert cli.main(["train-teacher", *M, "--run-dir", str(ro / "run")]) == 2
        err = _err(capsys)
        assert "Read-only file system" in err and str(ro / "run") in err and "Traceback" not in err
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tmp_path, monkeypatch, capsys):
    from jkd.data import pipeline

    real = pipeline.train_batches

    def interrupted(*a, **k):
        for i, b in enumerate(real(*a, **k)):
            if i == 40:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(pipeline, "train_batches", interrupted)
    run = tmp_path / "run"
    assert cli.main(["train-teacher", *M, "--epochs", "3", "--run-dir", str(run)]) == 130
    err = _err(capsys)
    # 31 steps an epoch: step 31 was saved, the run stopped at step 40.
    assert "jkd train-teacher: interrupted at step 40; the last checkpoint is step 31." in err
    assert f"kept in {run}" in err and "--resume" in err and "Traceback" not in err
    # 10. resuming says so, with the step it resumed from (not from scratch).
    monkeypatch.setattr(pipeline, "train_batches", real)
    assert cli.main(["train-teacher", *M, "--epochs", "3", "--run-dir", str(run), "--resume"]) == 0
    assert "teacher: resumed from the checkpoint of step 31" in capsys.readouterr().out


# ---- 7. nonsense settings are refused ------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--temperature", "-2"], "SoftKD.temperature (--temperature) must be a finite number > 0; got -2"),
        (["--temperature", "0"], "SoftKD.temperature (--temperature) must be a finite number > 0; got 0"),
        (["--kd-weight", "-1"], "SoftKD.kd_weight (--kd-weight) must be a finite number >= 0; got -1"),
        (["--kd-weight", "0", "--ce-weight", "0"], "kd_weight and ce_weight are both 0"),
        (["--weight-decay", "-1"], "weight_decay (--weight-decay) must be a finite number >= 0; got -1"),
        (["--parallel", "mesh", "--devices", "99"], "devices (--devices) must lie in [1, 4]"),
        (["--parallel", "mesh", "--devices", "0"], "devices (--devices) must lie in [1, 4]"),
        (["--parallel", "pmap", "--devices", "5"], "devices (--devices) must lie in [1, 4]"),
        (["--devices", "2"], "needs parallel 'mesh' or 'pmap'"),
        (
            ["--model-option", "hidden=abc"],
            "model option hidden='abc' for 'mlp': expected a tuple of positive integers",
        ),
        (["--model-option", "hidden=32"], "model option hidden=32 for 'mlp': expected a tuple of positive integers"),
        (["--model-option", "depth=3"], "model 'mlp' takes no option 'depth'; its options: hidden, dropout"),
    ],
)
def test_nonsense_settings_are_refused_before_anything_is_written(teacher_dir, tmp_path, capsys, extra, message):
    run = tmp_path / "d"
    argv = [
        "distill",
        "--teacher-dir",
        str(teacher_dir),
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--no-progress",
        "--run-dir",
        str(run),
        *extra,
    ]
    assert cli.main(argv) == 2
    assert message in _err(capsys)
    assert not run.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["distill", "--teacher-dir", "x", "--lr", "nan"],
        ["distill", "--teacher-dir", "x", "--temperature", "inf"],
        ["compress", "x", "--kd-weight=-inf"],
        ["lm", "distill", "--data", "a", "--test", "b", "--temperature", "inf"],
        ["lm", "distill", "--data", "a", "--test", "b", "--beta", "nan"],
    ],
)
def test_non_finite_numbers_are_refused_by_every_command(argv, capsys):
    """``--temperature inf`` once trained an LM student on a loss of 0 at every step and exited 0."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and "expected a finite number; got" in _err(capsys)


def test_non_finite_numbers_are_refused_by_the_config_classes():
    from jkd.jobs.lm import LMExperimentConfig
    from jkd.train.lm_steps import OnPolicyKD, TokenKD

    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="TokenKD.temperature must be a finite number > 0"):
            TokenKD(temperature=bad)
        with pytest.raises(ValueError, match="TokenKD.kd_weight must be a finite number >= 0"):
            TokenKD(kd_weight=bad)
        with pytest.raises(ValueError, match="OnPolicyKD.temperature must be a finite number > 0"):
            OnPolicyKD(temperature=bad)
        with pytest.raises(ValueError, match="OnPolicyKD.student_fraction"):
            OnPolicyKD(student_fraction=bad)
        with pytest.raises(ValueError, match="answer_temperature must be a finite number >= 0"):
            LMExperimentConfig(answer_temperature=bad).validate()


def test_one_device_on_the_single_runner_is_a_consistent_request():
    from jkd.jobs.image import ExperimentConfig

    ExperimentConfig(devices=1, parallel="single").validate()  # refused before: "needs parallel 'mesh' or 'pmap'"
    with pytest.raises(ValueError, match="needs parallel 'mesh' or 'pmap'"):
        ExperimentConfig(devices=2, parallel="single").validate()


def test_bad_seeds_say_what_is_expected(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["distill", "--teacher-dir", "x", "--seeds", "a,b"])
    assert e.value.code == 2 and "expected comma-separated integers, e.g. 0,1,2; got 'a,b'" in _err(capsys)


# ---- 8. class counts are never changed silently --------------------------------------------


def test_labels_1_to_k_are_refused_unless_the_class_count_is_given(tmp_path):
    x, y = _images(classes=4)
    with pytest.raises(ValueError, match=r"makes 5 classes, but classes \[0\] have no training image.*--num-classes"):
        user.validate({"train": (x, y + 1), "test": (x[:8], y[:8] + 1)})
    out, k = user.validate({"train": (x, y + 1), "test": (x[:8], y[:8] + 1)}, num_classes=5)
    assert k == 5


def test_a_negative_label_is_named_with_its_file_split_and_the_range_expected(tmp_path):
    from jkd.data import load_dataset

    x, y = _images(classes=4)
    y = y.copy()
    y[0] = -1  # was numpy's "'list' argument must have no negative elements"
    with pytest.raises(
        ValueError,
        match=r"neg\.npz: y_train holds 1 negative label\(s\) \(the first, -1, at index 0\); "
        r"class labels must lie in 0\.\.K-1",
    ):
        load_dataset(str(_npz(tmp_path / "neg.npz", x, y)), data_dir=tmp_path / "tfds")
    with pytest.raises(ValueError, match=r"y_test holds 1 negative label.*must lie in 0\.\.3"):
        user.validate(
            {"train": (x, np.arange(40) % 4), "test": (x[:8], np.array([0, 1, 2, -3, 0, 1, 2, 3]))}, num_classes=4
        )


def test_a_stray_label_in_train_only_is_refused(tmp_path):
    x, y = _images(classes=4)
    y = y.copy()
    y[7] = 4
    with pytest.raises(ValueError, match=r"classes 4 \(1 train images\) have no test image.*stray label"):
        user.validate({"train": (x, y), "test": (x[:8], np.arange(8) % 4)})


@pytest.mark.parametrize("empty", ["b", "c"])  # in the middle, and the last folder
def test_an_empty_class_folder_is_refused(tmp_path, empty):
    from PIL import Image

    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        if c != empty:
            for i in range(5):
                Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / c / f"{i}.png")
    with pytest.raises(ValueError, match=f"class folder {tmp_path / empty} holds no images"):
        user.read_image_folder(tmp_path)


# ---- 9. messages that say what is wrong ----------------------------------------------------


def test_a_text_file_named_npz(tmp_path):
    bad = tmp_path / "data.npz"
    bad.write_text("hello, I am text")
    with pytest.raises(ValueError, match="is not a readable .npz file") as e:
        user.read_npz(bad)
    assert "allow_pickle" not in str(e.value)


def test_object_labels_name_the_file_and_the_key(tmp_path):
    x, y = _images()
    path = tmp_path / "obj.npz"
    np.savez(path, x_train=x, y_train=np.array(["cat"] * 40, dtype=object), x_test=x[:8], y_test=y[:8])
    with pytest.raises(ValueError, match=f"{path}: y_train holds Python objects"):
        user.read_npz(path)


def test_mixed_grey_and_colour_images_are_named(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / c / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b" / "0.png")
    with pytest.raises(ValueError, match=r"mix greyscale and colour: 7 greyscale .* and 1 colour \(e.g. .*b/0.png\)"):
        user.read_image_folder(tmp_path)


# ---- 10. resuming says so; a refused resume names the keys ---------------------------------


@pytest.mark.slow
def test_a_refused_resume_names_the_keys_that_differ(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["train-teacher", *M, "--run-dir", run]) == 0
    assert cli.main(["train-teacher", *M, "--lr", "0.01", "--run-dir", run, "--resume"]) == 2
    err = _err(capsys)
    assert "teacher_optimizer.learning_rate (--lr): 0.001 -> 0.01" in err and "--force" in err
    assert cli.main(["train-teacher", *M, "--lr", "0.01", "--run-dir", run, "--force"]) == 0
    config = json.loads((Path(run) / "config.json").read_text())
    assert config["teacher_optimizer"]["learning_rate"] == 0.01
