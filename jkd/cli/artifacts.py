"""Commands on saved image models: ``jkd evaluate``, ``jkd export``, ``jkd compress``, and
``jkd report`` / ``jkd models``."""

from __future__ import annotations

import json
from pathlib import Path

from jkd.cli.common import finite
from jkd.cli.flags import add_config_flags, config_overrides, same_names
from jkd.runtime.atomic import atomic_write

# The CompressConfig fields `jkd compress` sets with flags of its own, field -> the flag's dest (the
# rest: jkd.cli.flags).
_COMPRESS_FLAGS = {
    **same_names(
        "sparsity",
        "per_layer",
        "structured_width",
        "prune_epochs",
        "qat_epochs",
        "calibration_images",
        "batch_size",
        "dataset",
        "data_dir",
    ),
    "quantize": "no_quantize",
    "formats": "format",
    "optimizer": "lr",
}


def _compress_config():
    from jkd.jobs.compress import CompressConfig

    return CompressConfig


def add_commands(sub) -> None:
    ev = sub.add_parser("evaluate", help="evaluate a saved model on a dataset's test split")
    ev.set_defaults(handler=evaluate_command)
    ev.add_argument("model_dir", help="a saved model folder, e.g. runs/demo/soft_kd_t_8/seed0")
    ev.add_argument("--dataset", default=None, help="default: the dataset the model was trained on")
    ev.add_argument("--data-dir", default=None)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--out", default=None, help="write the metrics JSON here")

    comp = sub.add_parser("compress", help="prune and int8-quantize a saved student (distilling), export it, report")
    comp.set_defaults(handler=compress_command)
    comp.add_argument("model_dir", help="a saved student, e.g. runs/demo/soft_kd_t_8/seed0")
    comp.add_argument(
        "--teacher-dir",
        default=None,
        help="the teacher that keeps teaching (default: <run>/teacher/model beside the student)",
    )
    comp.add_argument("--out", default=None, help="output folder (default: <model_dir>_compressed)")
    comp.add_argument(
        "--sparsity", type=finite, default=0.8, help="fraction of weights pruned, in [0, 1); 0: no pruning"
    )
    comp.add_argument("--per-layer", action="store_true", help="the same sparsity in every layer (default: global)")
    comp.add_argument(
        "--structured-width",
        type=finite,
        default=0.5,
        help="structured pruning: the fraction of neurons / channels kept in every layer, in (0, 1), "
        "giving a smaller dense student that runs faster; 0: none (MLPs and cnn)",
    )
    comp.add_argument("--prune-epochs", type=int, default=20, help="epochs of distillation while pruning")
    comp.add_argument("--qat-epochs", type=int, default=3, help="epochs of quantization-aware distillation; 0: none")
    comp.add_argument("--no-quantize", action="store_true", help="skip int8 quantization")
    comp.add_argument("--calibration-images", type=int, default=1024, help="training images for static int8 scales")
    comp.add_argument("--format", default="stablehlo,onnx", help="export formats, comma-separated, or 'none'")
    comp.add_argument("--temperature", type=finite, default=4.0, help="soft-KD temperature while fine-tuning")
    comp.add_argument("--kd-weight", type=finite, default=0.9)
    comp.add_argument("--ce-weight", type=finite, default=0.1)
    comp.add_argument("--lr", type=finite, default=2e-3, help="AdamW peak learning rate (cosine decay)")
    comp.add_argument("--dataset", default=None, help="default: the dataset the student was trained on")
    comp.add_argument("--data-dir", default=None)
    comp.add_argument("--batch-size", type=int, default=128)
    comp.add_argument(
        "--force",
        action="store_true",
        help="delete the results in --out (other settings, or a changed student or teacher) and start again",
    )
    comp.add_argument("--no-progress", action="store_true")

    add_config_flags(comp, _compress_config(), hand_written=_COMPRESS_FLAGS)

    exp = sub.add_parser("export", help="export a saved student to StableHLO and/or ONNX, for raw uint8 images")
    exp.set_defaults(handler=export_command)
    exp.add_argument("model_dir", help="a saved student, e.g. runs/demo/soft_kd_t_8/seed0")
    exp.add_argument("--out", default=None, help="output folder (default: <model_dir>_export)")
    exp.add_argument("--format", default="stablehlo,onnx", help="comma-separated: stablehlo, onnx")
    exp.add_argument(
        "--int8",
        action="store_true",
        help="also write model_int8.onnx: int8 in the QDQ form onnxruntime runs with integer kernels, "
        "scales calibrated on training images of the model's dataset",
    )
    exp.add_argument("--calibration-images", type=int, default=1024, help="--int8: training images for the scales")
    exp.add_argument("--data-dir", default=None, help="--int8: where the model's TFDS dataset is prepared")
    rep = sub.add_parser("report", help="print (and rewrite) the report of a run folder")
    rep.set_defaults(handler=report_command)
    rep.add_argument("run_dir")

    sub.add_parser("models", help="list the model names").set_defaults(handler=models_command)


def _formats(text: str) -> tuple[str, ...]:
    from jkd.export import check_formats

    if text.strip() == "none":
        return ()
    return check_formats(f.strip() for f in text.split(",") if f.strip())


def _student_dir(model_dir: str) -> Path:
    """The folder of a saved student, or a clear error naming what was given instead."""
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a saved student, e.g. runs/demo/soft_kd_t_8/seed0.")
    if (path / "config.json").exists() and not (path / "meta").exists():
        students = sorted(str(p.parent) for p in path.glob("*/seed*/meta"))
        raise ValueError(
            f"{path} is a run folder, not a model; give one of its students: "
            f"{', '.join(students) or '(none saved yet)'}."
        )
    return path


def export_command(args) -> int:
    from jkd import export as E
    from jkd.compress import quantization
    from jkd.saved import load_saved_model

    formats = _formats(args.format)
    if not formats:
        raise ValueError("no export format given; expected one or more of: stablehlo, onnx.")
    path = _student_dir(args.model_dir)
    graphdef, variables, meta = load_saved_model(path)
    if meta["role"] == "teacher":
        raise ValueError(
            f"{path} holds the teacher; jkd exports students only (the teacher stays with "
            "training). Give a student folder, e.g. runs/demo/soft_kd_t_8/seed0."
        )
    out = Path(args.out) if args.out else path.parent / f"{path.name}_export"
    if args.int8:
        if "onnx" not in formats:
            raise ValueError("--int8 writes an int8 ONNX model: include onnx in --format.")
        from jkd.jobs.compress import MIN_CALIBRATION_IMAGES

        if args.calibration_images < MIN_CALIBRATION_IMAGES:
            raise ValueError(
                f"--calibration-images must be >= {MIN_CALIBRATION_IMAGES} for static int8 scales; "
                f"got {args.calibration_images}."
            )
        calibration, (test_images, test_labels) = _calibration_images(meta, args.calibration_images, args.data_dir)
    with quantization.qwix_promotion():  # int8 students run qwix ops; float ones are unaffected
        paths = _export_and_check(graphdef, variables, meta, out, formats)
    if args.int8:
        import numpy as np

        q = E.quantize_onnx_int8(paths["onnx"], calibration, out / "model_int8.onnx")
        # The check that matters for int8: the test split, against the float model.
        ref = E.onnx_session(paths["onnx"]).run(None, {"images": test_images})[0]
        got = E.onnx_session(q).run(None, {"images": test_images})[0]
        print(
            f"onnx int8 (QDQ): {q} ({q.stat().st_size / 1024:.0f} KB); on the {len(test_labels)} test images: "
            f"accuracy {100 * float(np.mean(got.argmax(1) == test_labels)):.2f}% vs "
            f"{100 * float(np.mean(ref.argmax(1) == test_labels)):.2f}% in float, the same top-1 on "
            f"{100 * float(np.mean(ref.argmax(1) == got.argmax(1))):.2f}% ({len(calibration)} calibration images)"
        )
    print(f"preprocessing: {out / E.PREPROCESSING_FILE} (inputs are raw uint8 NHWC images; normalisation is inside)")
    return 0


def _calibration_images(meta: dict, n: int, data_dir):
    """``(n training images, the test images and labels)`` (raw uint8) of a saved model's
    dataset; the training images are chosen with seed 0."""
    import numpy as np

    from jkd.data import load_dataset
    from jkd.data import pipeline as P
    from jkd.saved import check_dataset

    ds = load_dataset(meta["dataset"], data_dir=data_dir)
    check_dataset(meta, ds.spec, where="the model")
    from jkd.jobs.compress import calibration_images

    test = P.reader(ds.split("test"), ds.spec.image_shape)
    return (calibration_images(P.reader(ds.split("train"), ds.spec.image_shape), n), test.read(np.arange(len(test))))


def _export_and_check(graphdef, variables, meta, out, formats):
    from jkd import export as E

    paths = E.export_model(graphdef, variables, meta, out, formats)
    for fmt, diff in E.check_artifacts(paths, graphdef, variables, meta).items():
        p = paths[fmt]
        print(f"{fmt}: {p} ({p.stat().st_size / 1024:.0f} KB); max |logit difference| vs JAX on 8 images: {diff:.1e}")
    return paths


def compress_command(args) -> int:
    from jkd.jobs.compress import CompressConfig, run_compress
    from jkd.train import AdamWConfig, objectives

    cfg = CompressConfig(
        sparsity=args.sparsity,
        per_layer=args.per_layer,
        structured_width=args.structured_width,
        prune_epochs=args.prune_epochs,
        qat_epochs=args.qat_epochs,
        quantize=not args.no_quantize,
        calibration_images=args.calibration_images,
        formats=_formats(args.format),
        objective=objectives.SoftKD(temperature=args.temperature, kd_weight=args.kd_weight, ce_weight=args.ce_weight),
        optimizer=AdamWConfig(learning_rate=args.lr, weight_decay=0.0, warmup_epochs=0.0),
        batch_size=args.batch_size,
        dataset=args.dataset,
        data_dir=args.data_dir,
        **config_overrides(args, CompressConfig),
    )
    cfg.validate()  # bad settings are refused before anything is loaded
    path = _student_dir(args.model_dir)
    out = Path(args.out) if args.out else path.parent / f"{path.name}_compressed"
    run_compress(path, out, teacher_dir=args.teacher_dir, config=cfg, progress=not args.no_progress, force=args.force)
    print(f"\ncompression report: {out / 'compress_report.md'}")
    return 0


def evaluate_command(args) -> int:
    from jkd.jobs.measure import evaluate_saved_model

    rep = evaluate_saved_model(args.model_dir, dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size)
    print(
        f"{rep['model']} on {rep['dataset']}: test accuracy {100 * rep['test_accuracy']:.2f}%, "
        f"loss {rep['test_loss']:.4f}, macro F1 {rep['macro_f1']:.4f}, ECE {rep['ece']:.4f}"
    )
    if args.out:
        atomic_write(args.out, json.dumps(rep, indent=2))
    return 0


def report_command(args) -> int:
    from jkd.evaluate import report

    print(report.rewrite(Path(args.run_dir)))
    return 0


def models_command(args) -> int:
    from jkd.models import MODELS

    print("\n".join(sorted(MODELS)))
    return 0
