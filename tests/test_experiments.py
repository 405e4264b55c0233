"""Every experiment has a pulse: its real config through `jkd run`, tiny sizes, temp folder."""

import json

import pytest
import tensorflow_datasets as tfds

from jkd import cli

TINY = [
    "--set",
    "teacher_epochs=1",
    "--set",
    "student_epochs=1",
    "--set",
    "seeds=(0,)",
    "--set",
    "eval_every_epochs=1",
    "--no-progress",
]


def test_source_example_learns_from_the_trained_teacher(tmp_path):
    assert cli.main(["run", "experiments/source_example/config.py", "--run-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["single_unit_grad_norm"] == 0.0 and r["single_unit_loss"] == 0.0  # the original's bug
    assert r["teacher_accuracy"] == 1.0
    assert r["student_kd_loss_after"] < 0.01 * r["student_kd_loss_before"]
    assert r["student_accuracy"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("config", ["hinton_mnist/config.py", "hinton_mnist/config_30.py"])
def test_hinton_configs_have_a_pulse(config, tmp_path):
    assert cli.main(["run", f"experiments/{config}", "--run-dir", str(tmp_path), *TINY]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["models"][1]["model"] in ("mlp_2x800", "mlp_30")


@pytest.mark.slow
def test_temperature_sweep_has_a_pulse(tmp_path):
    assert cli.main(["run", "experiments/temperature_sweep/config.py", "--run-dir", str(tmp_path), *TINY]) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["test_accuracy"]) == 4 and len(sweep["test_accuracy"][0]) == 3
    assert sweep["students"] == 12 and (tmp_path / "sweep_heatmap.png").is_file()
    # Edited temperatures never get the finished students' results: the rerun is refused.
    import dataclasses

    from jkd.jobs.image import run_sweep
    from jkd.runtime.run_folder import ConfigMismatchError

    cfg = cli.load_config_file("experiments/temperature_sweep/config.py").get_config()
    cfg = dataclasses.replace(cfg, teacher_epochs=1, student_epochs=1, seeds=(0,), eval_every_epochs=1)
    with pytest.raises(ConfigMismatchError, match=r"sweep.temperatures\[0\]: 1.0 -> 0.5"):
        run_sweep(cfg, tmp_path, temperatures=(0.5, 2.0, 4.0, 8.0), kd_weights=(0.0, 0.5, 0.9), resume=True)


def test_sweep_refuses_a_bad_grid_before_training(tmp_path):
    from jkd.jobs.image import demo_config, run_sweep

    with pytest.raises(ValueError, match="temperatures must be > 0"):
        run_sweep(demo_config(), tmp_path, temperatures=[1.0, 0.0], kd_weights=[0.5])
    with pytest.raises(ValueError, match=r"kd_weights must lie in \[0, 1\]"):
        run_sweep(demo_config(), tmp_path, temperatures=[1.0], kd_weights=[1.5])
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.slow
def test_cifar100_recipe_runs_a_few_steps_on_mock_data(tmp_path):
    """The recipe's students (SGD schedule, crops and flips, KD and DKD with its warm-up) under a
    saved resnet32x4 teacher: an untrained one, so the test does not spend ~30 s compiling the
    teacher's training step (the same step every student runs)."""
    from jkd.data import load_dataset
    from jkd.models import create_model
    from jkd.saved import ModelSpec, model_meta
    from jkd.train import freeze_model
    from jkd.train.checkpoint import save_frozen

    with tfds.testing.mock_data(num_examples=64):
        spec = load_dataset("cifar100").spec
        _, frozen = freeze_model(
            create_model("resnet32x4", num_classes=spec.num_classes, input_shape=spec.image_shape, seed=0)
        )
        save_frozen(tmp_path / "teacher", frozen, model_meta(ModelSpec("resnet32x4"), spec, "teacher"))
        assert (
            cli.main(
                [
                    "run",
                    "experiments/cifar100_kd/config.py",
                    "--run-dir",
                    str(tmp_path / "run"),
                    "--set",
                    f"teacher_dir={tmp_path / 'teacher'}",
                    "--set",
                    "student_epochs=1",
                    "--set",
                    "batch_size=32",
                    "--set",
                    "eval_every_epochs=1",
                    "--no-progress",
                ]
            )
            == 0
        )
    tmp_path = tmp_path / "run"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["resnet32x4"] + ["resnet8x4"] * 3
    assert [m["name"] for m in summary["models"]] == ["teacher", "student alone", "KD", "DKD"]


def test_every_method_of_the_leaderboard_reaches_the_gpu_config_and_the_cli():
    """The leaderboard's rows are the GPU config's rows; each CLI --loss builds its objective."""
    from jkd.train import objectives as O

    board = cli.load_config_file("experiments/leaderboard/config.py").get_config()
    gpu = cli.load_config_file("experiments/cifar100_kd/config_methods.py").get_config()
    board.validate()
    kinds = {type(d.objective) for d in board.distillations}
    assert kinds == {O.SoftKD, O.HardKD, O.DKD, O.RKD, O.SP, O.CRD, O.FunctionMatching, O.CrossEntropy}
    assert [type(d.objective) for d in gpu.distillations] == [type(d.objective) for d in board.distillations][:-1]
    assert gpu.student.name == "resnet8x4" and gpu.student_epochs == 240
    assert any(d.objective.standardize for d in board.distillations if isinstance(d.objective, (O.SoftKD, O.DKD)))
    assert any((getattr(d.objective, "warmup_epochs", None) or 0) > 0 for d in board.distillations)
    for loss in cli.LOSSES:
        args = cli.build_parser().parse_args(["distill", "--teacher-dir", "t", "--loss", loss])
        assert cli._objective(args) is not None


@pytest.mark.slow
def test_leaderboard_rows_run_and_report_the_gap_they_close(tmp_path):
    """Rows of the real leaderboard config (CRD with its heads, a student alone and function
    matching with mixup at the patient schedule) through `run`: roles, the gap against the
    student alone of the same schedule, the cost column."""
    import dataclasses

    from jkd.jobs.image import run

    cfg = cli.load_config_file("experiments/leaderboard/config.py").get_config()
    rows = {d.name: d for d in cfg.distillations}
    pick = [rows["CRD"], rows["student alone, 160 ep."], rows["function matching, 160 ep."]]
    pick = [dataclasses.replace(d, epochs=2 if d.epochs else None) for d in pick]
    cfg = dataclasses.replace(
        cfg, teacher_epochs=1, student_epochs=1, seeds=(0,), eval_every_epochs=1, distillations=tuple(pick)
    )
    summary = run(cfg, tmp_path, progress=False, echo=lambda *_: None)
    by_name = {m["name"]: m for m in summary["models"]}
    assert by_name["student alone, 160 ep."]["role"] == "student_alone"
    assert by_name["function matching, 160 ep."]["gap_reference"] == "student alone, 160 ep."
    assert by_name["CRD"]["gap_reference"] == "student alone"
    teacher, alone = by_name["teacher"]["test_accuracy_mean"], by_name["student alone"]["test_accuracy_mean"]
    crd = by_name["CRD"]
    if teacher > alone:
        assert abs(crd["gap_closed"] - (crd["test_accuracy_mean"] - alone) / (teacher - alone)) < 1e-9
    assert all(m["epoch_cost_vs_alone"] > 0 for m in summary["models"] if m["role"] == "distilled")
    report = (tmp_path / "report.md").read_text()
    assert "gap closed (%)" in report and "time / epoch (x alone)" in report
