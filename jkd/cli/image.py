"""The image commands: ``jkd demo``, ``jkd run``, ``jkd train-teacher``, ``jkd distill``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jkd.cli.flags import add_config_flags, config_overrides, same_names
from jkd.cli.common import (
    apply_overrides,
    parse_assignment,
    finite,
    float_list,
    load_config_file,
    run_folder_flags,
    seed_list,
)

LOSSES = ("soft", "hard", "dkd", "fm", "rkd", "sp", "crd")


def _objective(args):
    from jkd.train import objectives

    temperature = args.temperature if args.temperature is not None else 1.0 if args.loss == "fm" else 4.0
    if args.standardize and args.loss not in ("soft", "dkd"):
        raise ValueError(
            f"--standardize (logit standardisation) applies to --loss soft or dkd; got --loss {args.loss}."
        )
    if args.kd_warmup_epochs is not None and args.loss != "dkd":
        raise ValueError(f"--kd-warmup-epochs applies to --loss dkd; got --loss {args.loss}.")
    if args.mixup is not None and args.loss != "fm":
        raise ValueError(
            f"--mixup needs --loss fm (function matching: mixed images have no single label); got --loss {args.loss}."
        )
    fw = {} if args.feature_weight is None else {"weight": args.feature_weight}
    table = {
        "soft": lambda: objectives.SoftKD(
            temperature=temperature,
            kd_weight=args.kd_weight,
            ce_weight=args.ce_weight,
            standardize=args.standardize or None,
        ),
        "hard": lambda: objectives.HardKD(kd_weight=args.kd_weight, ce_weight=args.ce_weight),
        "dkd": lambda: objectives.DKD(
            tckd_weight=args.tckd_weight,
            nckd_weight=args.nckd_weight,
            temperature=temperature,
            kd_weight=args.kd_weight,
            ce_weight=args.ce_weight,
            warmup_epochs=args.kd_warmup_epochs,
            standardize=args.standardize or None,
        ),
        "fm": lambda: objectives.FunctionMatching(temperature=temperature),
        "rkd": lambda: (
            objectives.RKD()
            if args.feature_weight is None
            else objectives.RKD(distance_weight=args.feature_weight, angle_weight=2 * args.feature_weight)
        ),
        "sp": lambda: objectives.SP(**fw),
        "crd": lambda: objectives.CRD(**fw),
    }
    return table[args.loss]()


def _mixup_alpha(args) -> float | None:
    """``--mixup`` for function matching (default 1); None (no mixup) for the other losses."""
    if args.loss != "fm":
        return None
    return 1.0 if args.mixup is None else args.mixup


def _optimizer(name: str, lr: float | None, weight_decay: float | None):
    from jkd.train import AdamWConfig, SGDConfig

    cls = {"sgd": SGDConfig, "adamw": AdamWConfig}[name]
    kw = {}
    if lr is not None:
        kw["learning_rate"] = lr
    if weight_decay is not None:
        kw["weight_decay"] = weight_decay
    return cls(**kw)


def _model_spec(name: str, options: list[str]):
    from jkd.saved import ModelSpec

    return ModelSpec(name, tuple(parse_assignment(o) for o in options or ()))


def _saved_teacher_spec(teacher_dir: str):
    """The model spec of a saved teacher (its architecture is read, not guessed)."""
    from jkd.saved import ModelSpec, load_saved_model

    _, _, meta = load_saved_model(teacher_dir)
    if meta["role"] != "teacher":
        raise ValueError(f"{teacher_dir} holds a {meta['role']} model, not a teacher.")
    return ModelSpec(meta["model"], tuple(tuple(o) for o in meta["options"]))


def _data_args(p):
    p.add_argument(
        "--dataset",
        default="jkd_mnist_sample",
        help="TFDS name (jkd_mnist_sample, mnist, cifar10, ...), a .npz file or an image folder",
    )
    p.add_argument("--data-dir", default=None, help="where TFDS datasets are prepared (default: TFDS's)")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="user data: the number of classes (default: max label + 1, each with training images)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--devices", type=int, default=None, help="devices to use (default: all)")
    p.add_argument(
        "--parallel",
        choices=("single", "mesh", "pmap"),
        default="single",
        help="one device, jit over a ('data',) mesh, or pmap",
    )


def _train_args(p, what: str, default_model: str, default_epochs: int):
    p.add_argument("--model", default=default_model, help=f"{what} model name (see `jkd models`)")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="size option, e.g. width=0.5")
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    p.add_argument("--lr", type=finite, default=None, help="learning rate (default: the optimizer's)")
    p.add_argument("--weight-decay", type=finite, default=None)
    p.add_argument("--crop-padding", type=int, default=None, help="random-crop padding in pixels")


# The ExperimentConfig fields each command sets with flags of its own (field -> the flag's dest), and
# those that mean nothing to it; every other plain field gets a flag of its name (jkd.cli.flags).
_DATA_FLAGS = same_names("dataset", "data_dir", "num_classes", "batch_size", "devices", "parallel")
_DISTILL_FLAGS = {
    **_DATA_FLAGS,
    **same_names("teacher_dir", "seeds", "share_teacher_forward", "val_fraction", "store_teacher_topk"),
    "student_epochs": "epochs",
    "student_crop_padding": "crop_padding",
    "include_baseline": "no_baseline",
    "student": "model",
    "student_optimizer": "lr",
    "distillations": "loss",
}
_DISTILL_IGNORED = ("teacher_epochs", "teacher_crop_padding", "include_students")
_TEACHER_FLAGS = {
    **_DATA_FLAGS,
    "teacher_epochs": "epochs",
    "teacher_crop_padding": "crop_padding",
    "teacher": "model",
    "teacher_optimizer": "lr",
}
_TEACHER_IGNORED = (
    "teacher_dir",
    "student_epochs",
    "student_crop_padding",
    "seeds",
    "share_teacher_forward",
    "include_baseline",
    "include_students",
    "store_teacher_topk",
)


def _experiment_config():
    from jkd.jobs.image import ExperimentConfig

    return ExperimentConfig


def add_commands(sub) -> None:
    demo = sub.add_parser("demo", help="the main job on the embedded MNIST sample (no network)")
    demo.set_defaults(handler=demo_command)
    run_folder_flags(demo, run_dir="runs/demo")
    demo.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. student_epochs=5"
    )
    add_config_flags(demo, _experiment_config())

    run = sub.add_parser("run", help="run an experiment: jkd run experiments/<name>/config.py")
    run.set_defaults(handler=run_command)
    run.add_argument("config", help="an experiment's config.py (its get_config())")
    run_folder_flags(run, run_dir="")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")

    teacher = sub.add_parser("train-teacher", help="train a teacher and save it")
    teacher.set_defaults(handler=train_command)
    _data_args(teacher)
    _train_args(teacher, "teacher", "mlp_2x1200", 20)
    teacher.add_argument("--seed", type=int, default=0)
    run_folder_flags(teacher, run_dir="runs/teacher")
    add_config_flags(teacher, _experiment_config(), hand_written=_TEACHER_FLAGS, ignored=_TEACHER_IGNORED)

    distill = sub.add_parser("distill", help="distil a student from a saved teacher")
    distill.set_defaults(handler=train_command)
    _data_args(distill)
    _train_args(distill, "student", "mlp_100", 40)
    distill.add_argument("--teacher-dir", required=True, help="a saved teacher, e.g. runs/teacher/teacher/model")
    distill.add_argument("--loss", choices=LOSSES, default="soft")
    distill.add_argument("--temperature", type=finite, default=None, help="default 4 (soft, dkd), 1 (fm)")
    distill.add_argument(
        "--standardize",
        action="store_true",
        help="soft, dkd: logit standardisation (z-scored logits before the tempered softmax)",
    )
    distill.add_argument(
        "--kd-warmup-epochs",
        type=finite,
        default=None,
        help="dkd: ramp the distillation weight up linearly over these epochs (the paper: 20)",
    )
    distill.add_argument(
        "--mixup",
        type=finite,
        default=None,
        metavar="ALPHA",
        help="fm: mix each view with the next example's, lam ~ Beta(ALPHA, ALPHA) (default 1)",
    )
    distill.add_argument(
        "--feature-weight",
        type=finite,
        default=None,
        help="rkd: distance weight (angle: twice it; default 25); sp: default 3000; crd: default 0.8",
    )
    distill.add_argument("--kd-weight", type=finite, default=0.9)
    distill.add_argument("--ce-weight", type=finite, default=0.1)
    distill.add_argument("--tckd-weight", type=finite, default=1.0, help="DKD alpha")
    distill.add_argument("--nckd-weight", type=finite, default=8.0, help="DKD beta")
    distill.add_argument(
        "--seeds", type=seed_list, default=(0,), help="comma-separated seeds, trained together in one vmapped step"
    )
    distill.add_argument(
        "--share-teacher-forward",
        action="store_true",
        help="the seeds share one data order, augmented view and teacher forward pass (faster; "
        "the seed spread then measures initialisation only)",
    )
    distill.add_argument("--no-baseline", action="store_true", help="skip the student trained alone")
    distill.add_argument(
        "--store-teacher-topk",
        type=int,
        default=0,
        metavar="K",
        help="soft KD only, fixed views (no --crop-padding): store the teacher's top-K logits "
        "once and distil without its forward pass (default 0: online teacher)",
    )
    distill.add_argument(
        "--auto",
        action="store_true",
        help="choose loss, T and KD weight on a validation split (one vmapped run per loss), "
        "then train the choice and the student alone over --seeds",
    )
    distill.add_argument("--grid-losses", type=lambda s: tuple(s.split(",")), default=("soft", "dkd"))
    distill.add_argument("--grid-temperatures", type=float_list, default=(1.0, 2.0, 4.0, 8.0))
    distill.add_argument("--grid-kd-weights", type=float_list, default=(0.0, 0.5, 0.9))
    distill.add_argument("--val-fraction", type=finite, default=0.0, help="validation split from train (--auto: 0.1)")
    distill.add_argument(
        "--calibrate-teacher",
        action="store_true",
        help="--auto: temperature-scale the teacher on the validation split first",
    )
    run_folder_flags(distill, run_dir="runs/distill")
    add_config_flags(distill, _experiment_config(), hand_written=_DISTILL_FLAGS, ignored=_DISTILL_IGNORED)


def demo_command(args) -> int:
    from jkd.jobs import image as X

    cfg = dataclasses.replace(apply_overrides(X.demo_config(), args.set), **config_overrides(args, X.ExperimentConfig))
    X.run(cfg, args.run_dir, resume=True, force=args.force, progress=not args.no_progress)
    print(
        "\nYour own data? `jkd distill --auto --teacher-dir runs/demo/teacher/model --dataset DATA.npz "
        "--seeds 0,1,2` chooses the loss, T and KD weight on a validation split (never worse than the "
        "student alone there). Measured on this sample: ~3.7x the time of one distilled run "
        "(24 settings searched in one vmapped run per loss, then the choice and the student alone "
        "over 3 seeds)."
    )
    print(
        "More of the gap: `jkd run experiments/leaderboard/config.py` (~11 min here) compares every method; "
        "function matching (--loss fm: crops + mixup, the teacher's outputs only) at 160 epochs reached the "
        "teacher's accuracy there, against 96.27% for the student alone trained as long."
    )
    print(
        f"Ship a student: `jkd compress {args.run_dir}/soft_kd_t_8/seed0` prunes it (into a smaller dense "
        f"student too) and int8-quantizes it while the teacher keeps teaching (~35 s), and `jkd export ... --int8` "
        f"writes StableHLO/ONNX (and int8 ONNX) for raw images."
    )
    return 0


def run_command(args) -> int:
    from jkd.jobs import image as X

    module = load_config_file(args.config)
    cfg = apply_overrides(module.get_config(), args.set)
    cfg_path = Path(args.config).resolve()
    default = cfg_path.parent.name + ("" if cfg_path.stem == "config" else "_" + cfg_path.stem.removeprefix("config_"))
    run_dir = args.run_dir or str(Path("runs") / default)
    if hasattr(module, "main"):  # experiments that are more than one comparison (sweeps, toys)
        from jkd.runtime import hosts

        if hosts.active():
            raise ValueError(
                f"{args.config} is a custom experiment (its own main()), which runs on one "
                "process; run it on one host, without --coordinator/--num-processes/--process-id."
            )
        module.main(cfg, run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
        return 0
    from jkd.jobs import lm as LX

    jobs = {X.ExperimentConfig: X.run, LX.LMExperimentConfig: LX.run}  # the job a config's type names
    job = next((run for kind, run in jobs.items() if isinstance(cfg, kind)), None)
    if job is None:
        raise ValueError(
            f"{args.config}: get_config() must return an ExperimentConfig (images) or an "
            f"LMExperimentConfig (language models); got {type(cfg).__name__}."
        )
    job(cfg, run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
    return 0


def train_command(args) -> int:
    """``jkd train-teacher`` and ``jkd distill``."""
    from jkd.jobs import image as X

    common = dict(
        dataset=args.dataset,
        data_dir=args.data_dir,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        devices=args.devices,
        parallel=args.parallel,
    )
    if args.command == "train-teacher":
        kw = {} if args.crop_padding is None else {"teacher_crop_padding": args.crop_padding}
        cfg = X.ExperimentConfig(
            **common,
            **kw,
            teacher=_model_spec(args.model, args.model_option),
            teacher_epochs=args.epochs,
            teacher_optimizer=_optimizer(args.optimizer, args.lr, args.weight_decay),
            include_students=False,
            distillations=(),
            title=f"teacher {args.model} on {args.dataset}",
        )
    else:  # distill
        if args.auto and args.store_teacher_topk:
            raise ValueError(
                "--store-teacher-topk is not supported with --auto (its grid includes DKD, which needs "
                "the online teacher)."
            )
        if args.auto:  # a bad grid is refused before anything is read or trained
            X.AutoGrid(
                losses=args.grid_losses, temperatures=args.grid_temperatures, kd_weights=args.grid_kd_weights
            ).validate()
        kw = {} if args.crop_padding is None else {"student_crop_padding": args.crop_padding}
        cfg = X.ExperimentConfig(
            **common,
            **kw,
            teacher_dir=args.teacher_dir,
            teacher=_saved_teacher_spec(args.teacher_dir),
            student=_model_spec(args.model, args.model_option),
            student_epochs=args.epochs,
            student_optimizer=_optimizer(args.optimizer, args.lr, args.weight_decay),
            seeds=args.seeds,
            share_teacher_forward=args.share_teacher_forward,
            include_baseline=not args.no_baseline,
            val_fraction=args.val_fraction,
            store_teacher_topk=args.store_teacher_topk,
            distillations=(X.Distillation(f"{args.loss} KD", _objective(args), mixup_alpha=_mixup_alpha(args)),),
            title=f"{args.model} distilled ({args.loss}) on {args.dataset}",
        )
    cfg = dataclasses.replace(cfg, **config_overrides(args, X.ExperimentConfig))
    if args.command == "distill" and args.auto:
        grid = X.AutoGrid(losses=args.grid_losses, temperatures=args.grid_temperatures, kd_weights=args.grid_kd_weights)
        X.run_auto(
            cfg,
            args.run_dir,
            grid=grid,
            calibrate=args.calibrate_teacher,
            resume=args.resume,
            force=args.force,
            progress=not args.no_progress,
        )
        return 0
    X.run(cfg, args.run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
    return 0
