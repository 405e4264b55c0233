"""Settings chosen on validation data (`jkd distill --auto`, `run_auto`)."""

import json

import numpy as np
import pytest

from jkd import cli
from jkd.jobs.image import AutoGrid, ExperimentConfig, ModelSpec, choose_setting, run_auto


def _digits_npz(path):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0 * 255).round().astype(np.uint8)
    np.savez(path, x_train=x[:1400], y_train=d.target[:1400], x_test=x[1400:], y_test=d.target[1400:])
    return path


@pytest.mark.parametrize(
    "grid,match",
    [
        (AutoGrid(losses=("soft", "fitnets")), r"unknown loss\(es\) \['fitnets'\]"),
        (AutoGrid(temperatures=(1.0, -2.0)), "temperatures must be > 0"),
        (AutoGrid(temperatures=(0.0,)), "temperatures must be > 0"),
        (AutoGrid(kd_weights=(0.5, 0.9)), "must include 0"),
        (AutoGrid(kd_weights=(0.0, 1.5)), r"kd_weights must lie in \[0, 1\]"),
    ],
)
def test_bad_grid_is_refused_before_any_training(grid, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_auto(ExperimentConfig(), tmp_path / "run", grid=grid)
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_bad_grid(tmp_path, capsys):
    code = cli.main(
        [
            "distill",
            "--auto",
            "--teacher-dir",
            str(tmp_path / "none"),
            "--grid-losses",
            "soft,bogus",
            "--run-dir",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2 and "unknown loss(es) ['bogus']" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_auto_on_an_npz_dataset(tmp_path):
    cfg = ExperimentConfig(
        dataset=str(_digits_npz(tmp_path / "digits.npz")),
        teacher=ModelSpec("mlp", (("hidden", (256, 256)),)),
        student=ModelSpec("mlp_30"),
        teacher_epochs=3,
        student_epochs=3,
        batch_size=64,
        seeds=(0, 1),
        eval_every_epochs=1,
    )
    result = run_auto(cfg, tmp_path / "auto", grid=AutoGrid(temperatures=(1.0, 4.0)), calibrate=True, progress=False)
    choice = result["choice"]
    # The reported choice is the rule applied to the reported validation accuracies.
    val = {k: np.asarray(v) for k, v in result["val_accuracy"].items()}
    expected = choose_setting(val, AutoGrid(temperatures=(1.0, 4.0)), choice["validation_examples"])
    assert {k: choice[k] for k in expected} == expected
    assert result["calibration"]["temperature"] > 0 and "teacher_val_ece_after" in result["calibration"]
    assert len(result["test_accuracy_choice"]) == 2 and len(result["test_accuracy_student_alone"]) == 2
    for loss in ("soft", "dkd"):
        assert (tmp_path / "auto" / f"auto_heatmap_{loss}.png").is_file()
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "auto" / "final").glob("*/metrics.json")]
    chosen = [m for m in metrics if "auto_choice" in m]
    assert len(chosen) == 1 and chosen[0]["auto_choice"]["loss"] == choice["loss"]
    assert chosen[0]["best_val_accuracy"] > 0.1  # periodic evaluation ran on the validation split


GRID = AutoGrid(losses=("soft", "dkd"), temperatures=(1.0, 4.0), kd_weights=(0.0, 0.5, 0.9))


def _val(soft, dkd):
    return {"soft": np.asarray(soft, float), "dkd": np.asarray(dkd, float)}


def test_a_gain_within_one_standard_error_keeps_the_student_alone():
    # alone 0.80 on 400 examples: one standard error is sqrt(0.8 * 0.2 / 400) = 0.02.
    val = _val([[0.80, 0.815, 0.81], [0.79, 0.80, 0.819]], [[0.80, 0.80, 0.80], [0.80, 0.80, 0.80]])
    c = choose_setting(val, GRID, 400)
    assert c["required_gain"] == pytest.approx(0.02)
    assert (c["kd_weight"], c["val_accuracy"], c["student_alone_val_accuracy"]) == (0.0, 0.80, 0.80)


def test_a_gain_beyond_one_standard_error_is_chosen_with_its_setting():
    val = _val([[0.80, 0.815, 0.81], [0.79, 0.80, 0.819]], [[0.80, 0.80, 0.80], [0.80, 0.83, 0.80]])
    c = choose_setting(val, GRID, 400)
    assert (c["loss"], c["temperature"], c["kd_weight"], c["ce_weight"]) == ("dkd", 4.0, 0.5, 0.5)
    assert c["val_accuracy"] == 0.83
    # The same gain on 40 examples (standard error 0.063) is noise.
    assert choose_setting(val, GRID, 40)["kd_weight"] == 0.0


def test_ties_go_to_the_smaller_kd_weight():
    val = _val([[0.70, 0.90, 0.90], [0.70, 0.80, 0.80]], [[0.70, 0.85, 0.85], [0.70, 0.80, 0.90]])
    c = choose_setting(val, GRID, 1000)
    assert c["kd_weight"] == 0.5 and c["val_accuracy"] == 0.90
