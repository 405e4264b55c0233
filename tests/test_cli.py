"""Every subcommand has a pulse: the real entry point, tiny sizes, a temporary folder."""

import json

import pytest

from jkd import cli

TINY = [
    "--set",
    "teacher_epochs=1",
    "--set",
    "student_epochs=1",
    "--set",
    "seeds=(0, 1)",
    "--set",
    "eval_every_epochs=1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", "--run-dir", str(run_dir), *TINY]) == 0
    return run_dir


@pytest.mark.slow
def test_demo_writes_the_whole_run_folder(demo_dir):
    for f in (
        "config.json",
        "log.jsonl",
        "summary.json",
        "report.md",
        "curves.png",
        "accuracy_vs_size.png",
        "confusion_teacher.png",
        "roc_soft_kd_t_8.png",
    ):
        assert (demo_dir / f).is_file(), f
    assert list((demo_dir / "tb").rglob("events.out.tfevents.*"))
    summary = json.loads((demo_dir / "summary.json").read_text())
    roles = {m["name"]: m["role"] for m in summary["models"]}
    assert roles == {
        "teacher": "teacher",
        "student alone": "student_alone",
        "soft KD T=8": "distilled",
        "hard KD": "distilled",
        "DKD": "distilled",
    }
    for m in summary["models"]:
        assert {
            "name",
            "role",
            "loss",
            "test_accuracy_per_seed",
            "test_accuracy_mean",
            "test_accuracy_std",
            "params",
            "flops",
            "size_bytes",
            "latency_ms",
        } <= set(m)
        assert len(m["test_accuracy_per_seed"]) == (1 if m["role"] == "teacher" else 2)
        assert 0.1 < m["test_accuracy_mean"] <= 1.0  # better than chance after one epoch
    metrics = json.loads((demo_dir / "soft_kd_t_8" / "metrics.json").read_text())
    for key in (
        "test_accuracy",
        "test_loss",
        "best_test_accuracy",
        "last_test_accuracy",
        "precision",
        "recall",
        "f1",
        "macro_f1",
        "auc_ovr",
        "macro_auc_ovr",
        "ece",
        "teacher_agreement",
        "params",
        "flops",
    ):
        assert key in metrics, key
    assert len(metrics["f1"]) == 10
    assert (demo_dir / "teacher" / "model").is_dir() and (demo_dir / "soft_kd_t_8" / "ckpt").is_dir()
    assert "| teacher | teacher |" in (demo_dir / "report.md").read_text()


@pytest.mark.slow
def test_demo_rerun_resumes_and_a_changed_config_is_refused(demo_dir, capsys):
    assert cli.main(["demo", "--run-dir", str(demo_dir), *TINY]) == 0
    assert "teacher mlp_2x1200: loaded from" in capsys.readouterr().out
    assert cli.main(["demo", "--run-dir", str(demo_dir), *TINY, "--set", "student_epochs=2"]) == 2
    assert "another configuration" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_and_report(demo_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", str(demo_dir / "soft_kd_t_8" / "seed0"), "--out", str(out)]) == 0
    saved = json.loads((demo_dir / "soft_kd_t_8" / "metrics.json").read_text())
    assert json.loads(out.read_text())["test_accuracy"] == pytest.approx(saved["test_accuracy_per_seed"][0])
    assert cli.main(["report", str(demo_dir)]) == 0
    assert "| student alone | student_alone |" in capsys.readouterr().out


@pytest.mark.slow
def test_train_teacher_then_distill(tmp_path):
    t_dir = tmp_path / "t"
    assert (
        cli.main(
            [
                "train-teacher",
                "--model",
                "mlp",
                "--model-option",
                "hidden=(64,)",
                "--epochs",
                "1",
                "--run-dir",
                str(t_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    d_dir = tmp_path / "d"
    assert (
        cli.main(
            [
                "distill",
                "--teacher-dir",
                str(t_dir / "teacher" / "model"),
                "--model",
                "mlp_30",
                "--epochs",
                "1",
                "--loss",
                "dkd",
                "--seeds",
                "0,1",
                "--parallel",
                "mesh",
                "--devices",
                "2",
                "--run-dir",
                str(d_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((d_dir / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["teacher", "student alone", "dkd KD"]
    # Function matching from the command line: crops and mixup on a mesh, no label term.
    f_dir = tmp_path / "f"
    assert (
        cli.main(
            [
                "distill",
                "--teacher-dir",
                str(t_dir / "teacher" / "model"),
                "--model",
                "mlp_30",
                "--epochs",
                "1",
                "--loss",
                "fm",
                "--crop-padding",
                "2",
                "--mixup",
                "0.5",
                "--no-baseline",
                "--parallel",
                "mesh",
                "--devices",
                "2",
                "--run-dir",
                str(f_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    config = json.loads((f_dir / "config.json").read_text())
    assert config["distillations"][0]["mixup_alpha"] == 0.5 and config["student_crop_padding"] == 2
    assert json.loads((f_dir / "summary.json").read_text())["models"][1]["loss"] == "FunctionMatching"


@pytest.mark.slow
def test_run_config_file_with_overrides(tmp_path):
    cfg = "experiments/embedded_demo/config.py"
    assert (
        cli.main(
            [
                "run",
                cfg,
                "--run-dir",
                str(tmp_path / "r"),
                *TINY,
                "--set",
                "student.name=mlp_30",
                "--set",
                "distillations=()",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["mlp_2x1200", "mlp_30"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--set", "no_such_field=1"], "unknown config field 'no_such_field'"),
        (["run", "nowhere/config.py"], "no config file at"),
        (["demo", "--set", "parallel=gpu"], "parallel must be 'single', 'mesh' or 'pmap'"),
    ],
)
def test_bad_arguments(argv, message, tmp_path, capsys):
    try:
        code = cli.main([*argv, "--run-dir", str(tmp_path / "x")])
    except SystemExit as e:
        code, text = e.code, str(e)
    else:
        text = capsys.readouterr().err
    assert code != 0 and message in text


def test_evaluate_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "holds no saved jkd model" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    for sub in ("demo", "run", "train-teacher", "distill", "evaluate", "report", "models", "compress", "export"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
    assert "--temperature" in capsys.readouterr().out


def test_language_model_commands_offer_the_several_hosts_flags(capsys):
    """`jkd lm demo` and `jkd lm distill` run over several processes, as the image commands do."""
    for argv in (["lm", "distill", "--help"], ["lm", "demo", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = capsys.readouterr().out
        assert "--coordinator" in text and "--num-processes" in text and "--resume" in text and "--mesh" in text
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    assert "--coordinator" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["demo", "--set", "parallel=gpu"], 2, "parallel must be"),
        (["run", "nowhere/config.py"], "jkd: no config file at nowhere/config.py", None),
        (["train-teacher", "--lr", "-1"], 2, "learning_rate (--lr)"),
        (["distill", "--teacher-dir", "nowhere"], 2, "nowhere"),
        (["evaluate", "nowhere"], 2, "nowhere"),
        (["report", "nowhere"], 2, "nowhere/summary.json does not exist"),
        (["models"], 0, None),
        (["compress", "nowhere"], 2, "nowhere does not exist"),
        (["export", "nowhere"], 2, "nowhere does not exist"),
        (["lm", "demo", "--set", "answer_temperature=-1"], 2, "answer_temperature must be"),
        (["lm", "distill", "--data", "nowhere.jsonl", "--test", "nowhere.jsonl"], 2, "nowhere.jsonl: no such"),
        (["lm", "evaluate", "nowhere", "--test", "nowhere.jsonl"], 2, "nowhere.jsonl: no such"),
        (["lm", "generate", "nowhere", "--prompt", "hi"], 2, "model folder nowhere: no such folder"),
        (["lm", "export", "nowhere", "--out", "out"], 2, "model folder nowhere: no such folder"),
    ],
)
def test_every_command_runs_as_python_m_jkd_cli(argv, code, message, tmp_path, monkeypatch, capsys):
    """`python -m jkd.cli` runs the module as __main__: every command reaches its own code (the
    `lm evaluate|generate|export` functions once sat below the __main__ block: NameError)."""
    import runpy
    import sys
    import warnings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["jkd", *argv])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as e:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: jkd.cli is already imported by this test file
        runpy.run_module("jkd.cli", run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert "internal error" not in err and (message is None or message in err)


@pytest.mark.slow
def test_export_a_student_and_the_clear_errors(demo_dir, tmp_path, capsys):
    student = demo_dir / "soft_kd_t_8" / "seed0"
    assert cli.main(["export", str(student), "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert {p.name for p in (tmp_path / "e").iterdir()} == {"model.stablehlo", "model.onnx", "preprocessing.json"}
    assert "max |logit difference| vs JAX" in out
    bad = [
        ([str(demo_dir)], "is a run folder, not a model; give one of its students"),
        ([str(demo_dir / "teacher" / "model")], "holds the teacher; jkd exports students only"),
        ([str(student), "--format", "tflite"], "unknown export format 'tflite'"),
        ([str(tmp_path / "nowhere")], "does not exist"),
    ]
    for argv, message in bad:
        assert cli.main(["export", *argv, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_compress_reports_every_model_resumes_and_refuses_bad_input(demo_dir, tmp_path, capsys):
    student = demo_dir / "soft_kd_t_8" / "seed0"
    out = tmp_path / "c"
    argv = [
        "compress",
        str(student),
        "--out",
        str(out),
        "--prune-epochs",
        "2",
        "--qat-epochs",
        "1",
        "--calibration-images",
        "64",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    summary = json.loads((out / "compress_summary.json").read_text())
    names = [m["name"] for m in summary["models"]]
    assert names == [
        "teacher",
        "student",
        "pruned 80%",
        "structured 50%",
        "PTQ int8 weights",
        "PTQ int8 weights+activations (static)",
        "QAT int8 weights",
        "pruned 80% + int8 weights",
        "exported (stablehlo)",
        "exported (onnx)",
        "exported int8 weights (stablehlo)",
        "exported int8 (onnx, QDQ)",
        "structured 50% (onnx)",
        "structured 50% + int8 (onnx, QDQ)",
    ]
    rows = {m["name"]: m for m in summary["models"]}
    n = sum(v["size"] for v in summary["pruning"]["layers"].values())
    assert summary["pruning"]["prunable_sparsity"] == pytest.approx(int(0.8 * n) / n)  # real zeros, counted
    assert rows["pruned 80%"]["size_bytes"] < 0.5 * rows["student"]["size_bytes"]
    assert rows["exported int8 weights (stablehlo)"]["size_bytes"] < 0.4 * rows["exported (stablehlo)"]["size_bytes"]
    for fmt in ("stablehlo", "onnx"):
        check = summary["export_checks"][fmt]
        assert check["max_abs_diff"] < 1e-4 and check["top1_agreement"] >= 0.999
    assert "| exported (onnx) | student, exported |" in (out / "compress_report.md").read_text()
    capsys.readouterr()
    # A rerun resumes: every stage is loaded, nothing is trained again.
    assert cli.main(argv) == 0
    assert "pruned: loaded from" in capsys.readouterr().out
    # The pruned student is an ordinary saved model; an int8 one exports to StableHLO only.
    assert cli.main(["export", str(out / "pruned" / "model"), "--out", str(tmp_path / "pe")]) == 0
    assert cli.main(["export", str(out / "int8_static" / "model"), "--out", str(tmp_path / "qe")]) == 2
    assert "ONNX export of an int8 student" in capsys.readouterr().err
    assert (
        cli.main(["export", str(out / "int8_static" / "model"), "--format", "stablehlo", "--out", str(tmp_path / "qe")])
        == 0
    )
    # int8 ONNX from the float student, for onnxruntime: QDQ, calibrated on training images.
    assert (
        cli.main(["export", str(student), "--out", str(tmp_path / "q8"), "--int8", "--calibration-images", "64"]) == 0
    )
    assert "onnx int8 (QDQ):" in capsys.readouterr().out and (tmp_path / "q8" / "model_int8.onnx").is_file()
    assert cli.main(["export", str(student), "--out", str(tmp_path / "q9"), "--int8", "--format", "stablehlo"]) == 2
    assert "--int8 writes an int8 ONNX model" in capsys.readouterr().err and not (tmp_path / "q9").exists()
    # The structured student is a smaller model of the same family, saved like any other.
    assert cli.main(["evaluate", str(out / "structured" / "model")]) == 0
    assert "mlp_100 on jkd_mnist_sample: test accuracy" in capsys.readouterr().out
    for extra, message in (
        (["--sparsity", "1.0"], "sparsity must lie in [0, 1)"),
        (["--structured-width", "1.5"], "the structured width must lie in (0, 1)"),
        (["--calibration-images", "8"], "calibration_images must be >= 32"),
        (["--sparsity", "0.5"], "holds a run with another configuration (sparsity (--sparsity): 0.8 -> 0.5)"),
        (["--format", "tflite"], "unknown export format"),
    ):
        assert cli.main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["compress", str(demo_dir / "teacher" / "model"), "--out", str(tmp_path / "t")]) == 2
    assert "holds a teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_one_run_on_any_runner_and_device_count(tmp_path):
    """The README's promise, through the CLI with random crops on: one device, a 2-device mesh
    and pmap over 4 devices end with the same parameters (pmap once ended 0.042 away: each
    device drew its own crops). tests/train/test_parallel.py covers 4-device meshes."""
    import numpy as np

    from jkd.jobs.image import load_saved_model

    base = [
        "train-teacher",
        "--model",
        "mlp",
        "--model-option",
        "hidden=(32,)",
        "--epochs",
        "1",
        "--crop-padding",
        "2",
        "--no-progress",
    ]
    params = {}
    for name, extra in {
        "single": [],
        "mesh2": ["--parallel", "mesh", "--devices", "2"],
        "pmap4": ["--parallel", "pmap", "--devices", "4"],
    }.items():
        assert cli.main([*base, *extra, "--run-dir", str(tmp_path / name)]) == 0
        _, variables, _ = load_saved_model(tmp_path / name / "teacher" / "model")
        params[name] = [np.asarray(x) for x in __import__("jax").tree.leaves(variables.params)]
    for name in ("mesh2", "pmap4"):
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(params["single"], params[name]))
        assert diff < 1e-4, (name, diff)


def test_a_new_config_field_is_a_flag_without_touching_the_parser(monkeypatch, tmp_path):
    """Flags come from the config dataclasses: a field added to a job's config is settable at once,
    by its flag and by --set, parsed by its type."""
    import dataclasses

    from jkd.jobs import lm as LX
    from jkd.cli import lm as lm_commands

    extended = dataclasses.make_dataclass(
        "LMExperimentConfig",
        [("warmup_knob", int, dataclasses.field(default=3))],
        bases=(LX.LMExperimentConfig,),
        frozen=True,
    )
    monkeypatch.setattr(LX, "LMExperimentConfig", extended)
    argv = ["lm", "distill", "--data", "a.jsonl", "--test", "b.jsonl", "--test-limit", "7", "--warmup-knob", "5"]
    args = cli.build_parser().parse_args(argv)
    cfg = lm_commands._lm_config(args)
    assert isinstance(cfg, extended) and cfg.warmup_knob == 5 and cfg.test_limit == 7
    assert lm_commands._lm_config(cli.build_parser().parse_args(argv[:6])).warmup_knob == 3  # not given: the default
    assert cli.apply_overrides(extended(), ["warmup_knob=9", "test_limit=none"]) == extended(warmup_knob=9)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*argv[:6], "--warmup-knob", "many"])


def test_derived_flags_reach_every_job(capsys):
    """A plain field without a hand-written flag is a flag of every command that runs its job."""
    parser = cli.build_parser()
    for argv, field, value in (
        (["demo", "--eval-every-epochs", "2"], "eval_every_epochs", 2),
        (["distill", "--teacher-dir", "t", "--flip", "false"], "flip", False),
        (["train-teacher", "--val-seed", "4"], "val_seed", 4),
        (["lm", "demo", "--student-steps", "50", "--seeds", "0,1"], "seeds", (0, 1)),
        (["compress", "m", "--structured-multiple", "16"], "structured_multiple", 16),
    ):
        assert getattr(parser.parse_args(argv), f"config.{field}") == value, argv
    with pytest.raises(SystemExit):
        parser.parse_args(["lm", "demo", "--answer-temperature", "inf"])
    assert "expected a finite number" in capsys.readouterr().err


def test_run_takes_a_language_model_config_file(tmp_path, monkeypatch):
    """`jkd run config.py` runs the job its config names: an LMExperimentConfig goes to the LM job."""
    import jkd.jobs.lm as LX

    called = {}
    monkeypatch.setattr(LX, "run", lambda cfg, run_dir, **kw: called.update(cfg=cfg, run_dir=run_dir, **kw))
    cfg = tmp_path / "lm.py"
    cfg.write_text("from jkd.jobs.lm import LMExperimentConfig\n\ndef get_config():\n    return LMExperimentConfig()\n")
    assert (
        cli.main(["run", str(cfg), "--run-dir", str(tmp_path / "r"), "--set", "student_steps=7", "--no-progress"]) == 0
    )
    assert called["cfg"].student_steps == 7 and called["run_dir"] == str(tmp_path / "r") and called["progress"] is False
    other = tmp_path / "other.py"
    other.write_text("def get_config():\n    return {'steps': 3}\n")
    assert cli.main(["run", str(other), "--run-dir", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize(
    "flags, name, reads_teacher",
    [
        ([], "token fkl", True),
        (["--kd-weight", "0", "--ce-weight", "1"], "labels only", False),
        (
            ["--mode", "sequence", "--kd-weight", "0", "--ce-weight", "1", "--unlabelled", "u.jsonl"],
            "sequence CE",
            False,
        ),
        (["--mode", "sequence", "--unlabelled", "u.jsonl"], "sequence fkl", True),
        (["--mode", "on-policy", "--loss", "jsd", "--unlabelled", "u.jsonl"], "on-policy jsd", True),
    ],
)
def test_a_distillation_is_named_for_what_the_student_learns(flags, name, reads_teacher):
    """With --kd-weight 0 no loss reads the teacher's distributions: the setting is not named after
    a divergence it does not train."""
    from jkd.cli.lm import _lm_config

    args = cli.build_parser().parse_args(["lm", "distill", "--data", "d.jsonl", "--test", "t.jsonl", *flags])
    (d,) = _lm_config(args).distillations
    assert d.name == name
    assert (getattr(d.objective, "kd_weight", 1.0) > 0) == reads_teacher
