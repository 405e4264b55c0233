"""The ``jkd`` command. Thin: parses arguments, builds a typed config, calls the library.

The only name-to-object tables of jkd live here (losses, optimizers): the library below takes
objects, never strings.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

LOSSES = ("soft", "hard", "dkd", "fm", "rkd", "sp", "crd")
LM_MODES = ("token", "sequence", "on-policy")
LM_LOSSES = {"fkl": "ForwardKL", "rkl": "ReverseKL", "jsd": "GeneralizedJSD", "skew-fkl": "SkewForwardKL",
             "skew-rkl": "SkewReverseKL", "tv": "TotalVariation"}


def _lm_config(args):
    """``jkd lm distill``'s flags as an :class:`~jkd.lm_experiment.LMExperimentConfig`."""
    import jkd.losses as losses
    from jkd import lm_experiment as LX
    from jkd.models.hf import read_config
    from jkd.train.lm_steps import OnPolicyKD, TokenKD

    cls = getattr(losses, LM_LOSSES[args.loss])
    kw = {"beta": args.beta} if args.loss == "jsd" else {"alpha": args.alpha} if args.loss.startswith("skew") else {}
    divergence = cls(**kw)
    if args.mode == "on-policy":
        objective = OnPolicyKD(divergence=divergence, temperature=args.temperature,
                               student_fraction=args.student_fraction, max_new_tokens=args.max_new_tokens)
    else:
        objective = TokenKD(divergence=divergence, temperature=args.temperature, kd_weight=args.kd_weight,
                            ce_weight=args.ce_weight)
    if args.mode != "token" and not args.unlabelled:
        raise ValueError(f"--mode {args.mode} needs --unlabelled (requests the teacher answers or the student samples).")
    if Path(args.student).is_dir():
        student = read_config(args.student)
    else:
        try:
            width, layers = (int(x) for x in args.student.lower().split("x"))
        except ValueError:
            raise ValueError(f"--student must be WIDTHxLAYERS (e.g. 64x2) or a folder with config.json; "
                             f"got {args.student!r}.") from None
        student = LX._decoder(1024, width, layers)
    from jkd.train import AdamWConfig

    opt = AdamWConfig(learning_rate=args.lr, weight_decay=0.0, warmup_epochs=0.1)
    return LX.LMExperimentConfig(
        train_file=args.data, test_file=args.test, unlabelled_file=args.unlabelled, teacher_dir=args.teacher,
        students=(LX.LMStudent(f"student {args.student}", student),), max_length=args.max_length,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, pack_length=args.pack_length,
        student_steps=args.steps, teacher_steps=args.teacher_steps, teacher_optimizer=opt, student_optimizer=opt, labelled_subset=None,
        seeds=args.seeds, include_baseline=not args.no_baseline,
        distillations=(LX.LMDistillation(f"{args.mode} {args.loss}", objective,
                                         teacher_answers=args.mode == "sequence"),),
        title=f"{args.mode} distillation ({args.loss}) of {args.data}")


def _objective(args):
    from jkd.train import objectives

    temperature = args.temperature if args.temperature is not None else 1.0 if args.loss == "fm" else 4.0
    if args.standardize and args.loss not in ("soft", "dkd"):
        raise ValueError(f"--standardize (logit standardisation) applies to --loss soft or dkd; got --loss {args.loss}.")
    if args.kd_warmup_epochs is not None and args.loss != "dkd":
        raise ValueError(f"--kd-warmup-epochs applies to --loss dkd; got --loss {args.loss}.")
    if args.mixup is not None and args.loss != "fm":
        raise ValueError(f"--mixup needs --loss fm (function matching: mixed images have no single label); got "
                         f"--loss {args.loss}.")
    fw = {} if args.feature_weight is None else {"weight": args.feature_weight}
    table = {
        "soft": lambda: objectives.SoftKD(temperature=temperature, kd_weight=args.kd_weight, ce_weight=args.ce_weight,
                                          standardize=args.standardize or None),
        "hard": lambda: objectives.HardKD(kd_weight=args.kd_weight, ce_weight=args.ce_weight),
        "dkd": lambda: objectives.DKD(tckd_weight=args.tckd_weight, nckd_weight=args.nckd_weight,
                                      temperature=temperature, kd_weight=args.kd_weight, ce_weight=args.ce_weight,
                                      warmup_epochs=args.kd_warmup_epochs, standardize=args.standardize or None),
        "fm": lambda: objectives.FunctionMatching(temperature=temperature),
        "rkd": lambda: objectives.RKD() if args.feature_weight is None else objectives.RKD(
            distance_weight=args.feature_weight, angle_weight=2 * args.feature_weight),
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

    return ModelSpec(name, tuple(_parse_assignment(o) for o in options or ()))


def _parse_assignment(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise SystemExit(f"jkd: expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string
    return key.strip(), value


def apply_overrides(cfg, assignments: list[str]):
    """``key=value`` (or ``student.name=value``) overrides of a frozen config dataclass."""
    for text in assignments or ():
        key, value = _parse_assignment(text)
        path = key.split(".")
        cfg = _replace_path(cfg, path, value, key)
    return cfg


def _replace_path(obj, path, value, full_key):
    if "[" in path[0]:  # students[0].config.hidden_size: one element of a tuple field
        name, index = path[0].rstrip("]").split("[")
        items = getattr(obj, name, None)
        if not isinstance(items, tuple) or not index.isdigit() or int(index) >= len(items):
            raise SystemExit(f"jkd: {full_key!r}: {name} has no element {index}")
        items = list(items)
        items[int(index)] = _replace_path(items[int(index)], path[1:], value, full_key) if len(path) > 1 else value
        return dataclasses.replace(obj, **{name: tuple(items)})
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise SystemExit(f"jkd: unknown config field {full_key!r}; fields here: {', '.join(sorted(names))}")
    if len(path) > 1:
        value = _replace_path(getattr(obj, path[0]), path[1:], value, full_key)
    elif isinstance(getattr(obj, path[0]), tuple) and isinstance(value, (int, float)):
        value = (value,)
    elif isinstance(getattr(obj, path[0]), tuple) and isinstance(value, list):
        value = tuple(value)
    return dataclasses.replace(obj, **{path[0]: value})


def load_config_file(path: str):
    """An experiment's config module: ``get_config()`` and, for custom experiments, ``main()``."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"jkd: no config file at {p}")
    spec = importlib.util.spec_from_file_location(f"jkd_config_{p.parent.name}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"jkd: {p} defines no get_config()")
    return module


def _finite(text: str) -> float:
    """A flag's number: finite (``inf`` and ``nan`` would train nothing, or train on garbage)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct; got {text!r}")
    return seeds


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,2,4; got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers; got {text!r}")
    return values


def _common(p: argparse.ArgumentParser, *, run_dir: str, several_hosts: bool = True) -> None:
    p.add_argument("--run-dir", default=run_dir, help=f"run folder (default {run_dir})")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir (same config)")
    p.add_argument("--force", action="store_true",
                   help="delete the run in --run-dir (another config) and start this one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if not several_hosts:  # one process: a launch as several (SLURM, a TPU slice) is still detected and refused
        p.set_defaults(coordinator=None, num_processes=None, process_id=None, peer_timeout=30.0)
        return
    hosts = p.add_argument_group(
        "several hosts", "one process per host, the same command on each (a TPU slice, SLURM and Open MPI are "
        "detected without these flags); --batch-size stays the global batch")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address (or $JAX_COORDINATOR_ADDRESS)")
    hosts.add_argument("--num-processes", type=int, default=None, help="processes in the run (or $JAX_NUM_PROCESSES)")
    hosts.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1 (or $JAX_PROCESS_ID)")
    hosts.add_argument("--peer-timeout", type=_finite, default=30.0, metavar="SECONDS",
                       help="stop with an error when another process is silent this long (default 30)")


def _data_args(p):
    p.add_argument("--dataset", default="jkd_mnist_sample",
                   help="TFDS name (jkd_mnist_sample, mnist, cifar10, ...), a .npz file or an image folder")
    p.add_argument("--data-dir", default=None, help="where TFDS datasets are prepared (default: TFDS's)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="user data: the number of classes (default: max label + 1, each with training images)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--devices", type=int, default=None, help="devices to use (default: all)")
    p.add_argument("--parallel", choices=("single", "mesh", "pmap"), default="single",
                   help="one device, jit over a ('data',) mesh, or pmap")


def _train_args(p, what: str, default_model: str, default_epochs: int):
    p.add_argument("--model", default=default_model, help=f"{what} model name (see `jkd models`)")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="size option, e.g. width=0.5")
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    p.add_argument("--lr", type=_finite, default=None, help="learning rate (default: the optimizer's)")
    p.add_argument("--weight-decay", type=_finite, default=None)
    p.add_argument("--crop-padding", type=int, default=None, help="random-crop padding in pixels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jkd", description="Knowledge distillation in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on the embedded MNIST sample (no network)")
    _common(demo, run_dir="runs/demo")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. student_epochs=5")

    run = sub.add_parser("run", help="run an experiment: jkd run experiments/<name>/config.py")
    run.add_argument("config", help="an experiment's config.py (its get_config())")
    _common(run, run_dir="")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")

    teacher = sub.add_parser("train-teacher", help="train a teacher and save it")
    _data_args(teacher)
    _train_args(teacher, "teacher", "mlp_2x1200", 20)
    teacher.add_argument("--seed", type=int, default=0)
    _common(teacher, run_dir="runs/teacher")

    distill = sub.add_parser("distill", help="distil a student from a saved teacher")
    _data_args(distill)
    _train_args(distill, "student", "mlp_100", 40)
    distill.add_argument("--teacher-dir", required=True, help="a saved teacher, e.g. runs/teacher/teacher/model")
    distill.add_argument("--loss", choices=LOSSES, default="soft")
    distill.add_argument("--temperature", type=_finite, default=None, help="default 4 (soft, dkd), 1 (fm)")
    distill.add_argument("--standardize", action="store_true",
                         help="soft, dkd: logit standardisation (z-scored logits before the tempered softmax)")
    distill.add_argument("--kd-warmup-epochs", type=_finite, default=None,
                         help="dkd: ramp the distillation weight up linearly over these epochs (the paper: 20)")
    distill.add_argument("--mixup", type=_finite, default=None, metavar="ALPHA",
                         help="fm: mix each view with the next example's, lam ~ Beta(ALPHA, ALPHA) (default 1)")
    distill.add_argument("--feature-weight", type=_finite, default=None,
                         help="rkd: distance weight (angle: twice it; default 25); sp: default 3000; crd: default 0.8")
    distill.add_argument("--kd-weight", type=_finite, default=0.9)
    distill.add_argument("--ce-weight", type=_finite, default=0.1)
    distill.add_argument("--tckd-weight", type=_finite, default=1.0, help="DKD alpha")
    distill.add_argument("--nckd-weight", type=_finite, default=8.0, help="DKD beta")
    distill.add_argument("--seeds", type=_seeds, default=(0,),
                         help="comma-separated seeds, trained together in one vmapped step")
    distill.add_argument("--share-teacher-forward", action="store_true",
                         help="the seeds share one data order, augmented view and teacher forward pass (faster; "
                              "the seed spread then measures initialisation only)")
    distill.add_argument("--no-baseline", action="store_true", help="skip the student trained alone")
    distill.add_argument("--store-teacher-topk", type=int, default=0, metavar="K",
                         help="soft KD only, fixed views (no --crop-padding): store the teacher's top-K logits "
                              "once and distil without its forward pass (default 0: online teacher)")
    distill.add_argument("--auto", action="store_true",
                         help="choose loss, T and KD weight on a validation split (one vmapped run per loss), "
                              "then train the choice and the student alone over --seeds")
    distill.add_argument("--grid-losses", type=lambda s: tuple(s.split(",")), default=("soft", "dkd"))
    distill.add_argument("--grid-temperatures", type=_floats, default=(1.0, 2.0, 4.0, 8.0))
    distill.add_argument("--grid-kd-weights", type=_floats, default=(0.0, 0.5, 0.9))
    distill.add_argument("--val-fraction", type=_finite, default=0.0, help="validation split from train (--auto: 0.1)")
    distill.add_argument("--calibrate-teacher", action="store_true",
                         help="--auto: temperature-scale the teacher on the validation split first")
    _common(distill, run_dir="runs/distill")

    ev = sub.add_parser("evaluate", help="evaluate a saved model on a dataset's test split")
    ev.add_argument("model_dir", help="a saved model folder, e.g. runs/demo/soft_kd_t_8/seed0")
    ev.add_argument("--dataset", default=None, help="default: the dataset the model was trained on")
    ev.add_argument("--data-dir", default=None)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--out", default=None, help="write the metrics JSON here")

    comp = sub.add_parser("compress", help="prune and int8-quantize a saved student (distilling), export it, report")
    comp.add_argument("model_dir", help="a saved student, e.g. runs/demo/soft_kd_t_8/seed0")
    comp.add_argument("--teacher-dir", default=None,
                      help="the teacher that keeps teaching (default: <run>/teacher/model beside the student)")
    comp.add_argument("--out", default=None, help="output folder (default: <model_dir>_compressed)")
    comp.add_argument("--sparsity", type=_finite, default=0.8, help="fraction of weights pruned, in [0, 1); 0: no pruning")
    comp.add_argument("--per-layer", action="store_true", help="the same sparsity in every layer (default: global)")
    comp.add_argument("--structured-width", type=_finite, default=0.5,
                      help="structured pruning: the fraction of neurons / channels kept in every layer, in (0, 1), "
                           "giving a smaller dense student that runs faster; 0: none (MLPs and cnn)")
    comp.add_argument("--prune-epochs", type=int, default=20, help="epochs of distillation while pruning")
    comp.add_argument("--qat-epochs", type=int, default=3, help="epochs of quantization-aware distillation; 0: none")
    comp.add_argument("--no-quantize", action="store_true", help="skip int8 quantization")
    comp.add_argument("--calibration-images", type=int, default=1024, help="training images for static int8 scales")
    comp.add_argument("--format", default="stablehlo,onnx", help="export formats, comma-separated, or 'none'")
    comp.add_argument("--temperature", type=_finite, default=4.0, help="soft-KD temperature while fine-tuning")
    comp.add_argument("--kd-weight", type=_finite, default=0.9)
    comp.add_argument("--ce-weight", type=_finite, default=0.1)
    comp.add_argument("--lr", type=_finite, default=2e-3, help="AdamW peak learning rate (cosine decay)")
    comp.add_argument("--dataset", default=None, help="default: the dataset the student was trained on")
    comp.add_argument("--data-dir", default=None)
    comp.add_argument("--batch-size", type=int, default=128)
    comp.add_argument("--force", action="store_true",
                      help="delete the results in --out (other settings, or a changed student or teacher) and start again")
    comp.add_argument("--no-progress", action="store_true")

    exp = sub.add_parser("export", help="export a saved student to StableHLO and/or ONNX, for raw uint8 images")
    exp.add_argument("model_dir", help="a saved student, e.g. runs/demo/soft_kd_t_8/seed0")
    exp.add_argument("--out", default=None, help="output folder (default: <model_dir>_export)")
    exp.add_argument("--format", default="stablehlo,onnx", help="comma-separated: stablehlo, onnx")
    exp.add_argument("--int8", action="store_true",
                     help="also write model_int8.onnx: int8 in the QDQ form onnxruntime runs with integer kernels, "
                          "scales calibrated on training images of the model's dataset")
    exp.add_argument("--calibration-images", type=int, default=1024, help="--int8: training images for the scales")
    exp.add_argument("--data-dir", default=None, help="--int8: where the model's TFDS dataset is prepared")

    lm = sub.add_parser("lm", help="language models: distil a tool-using model into a small one")
    lm_sub = lm.add_subparsers(dest="lm_command", required=True)
    lm_demo = lm_sub.add_parser("demo", help="the agent demo on the embedded tool-use conversations (no network)")
    _common(lm_demo, run_dir="runs/lm_demo", several_hosts=False)
    lm_demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. student_steps=50")

    lm_dist = lm_sub.add_parser("distill", help="distil your own conversations: a teacher (trained here or a "
                                "Hugging Face folder) into a small student, measured against the student alone")
    _common(lm_dist, run_dir="runs/lm", several_hosts=False)
    lm_dist.add_argument("--data", required=True, help="labelled conversations, .jsonl (chat messages per line)")
    lm_dist.add_argument("--test", required=True, help="held-out conversations, .jsonl")
    lm_dist.add_argument("--unlabelled", help="requests without answers, .jsonl (sequence-level and on-policy modes)")
    lm_dist.add_argument("--teacher", help="a Hugging Face model folder (Llama / Qwen2 / Qwen3) with its "
                         "tokenizer; default: train a teacher here on --data")
    lm_dist.add_argument("--student", default="64x2", help="the student: WIDTHxLAYERS (default 64x2), or a folder "
                         "with a config.json to copy the architecture from")
    lm_dist.add_argument("--mode", choices=LM_MODES, default="token")
    lm_dist.add_argument("--loss", choices=sorted(LM_LOSSES), default="fkl")
    lm_dist.add_argument("--temperature", type=_finite, default=1.0)
    lm_dist.add_argument("--beta", type=_finite, default=0.5, help="JSD interpolation (jsd)")
    lm_dist.add_argument("--alpha", type=_finite, default=0.1, help="skew of skew-fkl / skew-rkl")
    lm_dist.add_argument("--lambda", dest="student_fraction", type=_finite, default=0.5,
                         help="on-policy: the share of steps on the student's own samples")
    lm_dist.add_argument("--kd-weight", type=_finite, default=1.0)
    lm_dist.add_argument("--ce-weight", type=_finite, default=0.0)
    lm_dist.add_argument("--max-length", type=int, default=256, help="tokens per sequence (longer ones are cut)")
    lm_dist.add_argument("--max-new-tokens", type=int, default=64)
    lm_dist.add_argument("--batch-size", type=int, default=16, help="rows per step (of --pack-length when packing)")
    lm_dist.add_argument("--pack-length", type=int, default=None, help="pack whole conversations into rows of this "
                         "many tokens (at least --max-length; on-policy steps keep one prompt per row)")
    lm_dist.add_argument("--steps", type=int, default=200, help="student optimizer steps")
    lm_dist.add_argument("--teacher-steps", type=int, default=400, help="teacher steps (when trained here)")
    lm_dist.add_argument("--lr", type=_finite, default=3e-3)
    lm_dist.add_argument("--seeds", type=_seeds, default=(0,))
    lm_dist.add_argument("--no-baseline", action="store_true", help="skip the student alone")

    lm_eval = lm_sub.add_parser("evaluate", help="tool-use metrics and cross-entropy of a Hugging Face model "
                                "folder on test conversations")
    lm_eval.add_argument("model", help="a Hugging Face model folder with its tokenizer (e.g. runs/lm_demo/<group>/seed0)")
    lm_eval.add_argument("--test", required=True, help="conversations, .jsonl")
    lm_eval.add_argument("--max-length", type=int, default=256)
    lm_eval.add_argument("--max-new-tokens", type=int, default=64)
    lm_eval.add_argument("--out", help="also write the metrics to this JSON file")
    lm_gen = lm_sub.add_parser("generate", help="answer requests with a Hugging Face model folder")
    lm_gen.add_argument("model", help="a Hugging Face model folder with its tokenizer")
    lm_gen.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    lm_gen.add_argument("--max-new-tokens", type=int, default=64)
    lm_gen.add_argument("--temperature", type=_finite, default=0.0, help="0: greedy")
    lm_gen.add_argument("--seed", type=int, default=0)

    lm_exp = lm_sub.add_parser("export", help="a Hugging Face model folder's forward pass as StableHLO "
                               "(tokens -> logits, any batch and length), with its tokenizer")
    lm_exp.add_argument("model", help="a Hugging Face model folder with its tokenizer")
    lm_exp.add_argument("--out", required=True, help="the folder to write (model.stablehlo, serving.json, tokenizer)")

    rep = sub.add_parser("report", help="print (and rewrite) the report of a run folder")
    rep.add_argument("run_dir")

    sub.add_parser("models", help="list the model names")
    return parser


# What a user (or the machine) got wrong: one line and exit 2. Anything else is a bug of jkd's
# and keeps its traceback. ImportError counts only when jkd raised it with an install hint.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                NotADirectoryError, FloatingPointError, ConnectionError)


def _is_user_error(e: BaseException) -> bool:
    import errno

    from jkd.faults import is_disk_full

    if isinstance(e, _USER_ERRORS) or is_disk_full(e):
        return True
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return True
    return isinstance(e, ImportError) and "pip install" in str(e)


class _DropDiskFullLogs:
    """orbax's writer threads log a full disk as ERROR records with tracebacks before the
    main thread sees the error; jkd then reports it once, plainly, so those are dropped."""

    def filter(self, record) -> bool:
        from jkd.faults import is_disk_full

        exc = record.exc_info[1] if record.exc_info else None
        return not (is_disk_full(exc) or "No space left on device" in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    import logging

    import jkd
    from jkd import hosts

    jkd.initialize()  # before any JAX computation of this process
    parser = build_parser()
    args = parser.parse_args(argv)
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropDiskFullLogs) for f in absl_logger.filters):
        absl_logger.addFilter(_DropDiskFullLogs())
    code, failure = _run_command(args, parser)
    if hosts.active():  # a run over several processes: the others learn how this one ended
        hosts.finish(failure)
        if failure is not None:  # no shutdown barrier: the peers are stopping, not arriving
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _run_command(args, parser) -> tuple[int, str | None]:
    """``(exit code, None)`` on success, else ``(code, the one-line reason)`` (already printed)."""
    try:
        _join_processes(args)
        return _dispatch(args, parser), None
    except KeyboardInterrupt as e:
        what = str(e) if str(e) else "interrupted"  # RunInterrupted says at which step
        run_dir = getattr(args, "run_dir", None) or getattr(args, "out", None)
        saved = f" Saved progress is kept in {run_dir}:" if run_dir else ""
        print(f"\njkd {args.command}: {what}.{saved} rerun the same command with --resume to continue "
              "from the last checkpoint.", file=sys.stderr)
        return 130, what
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs just below
        if not _is_user_error(e):
            import traceback

            from jkd import hosts

            hosts.await_lost_peer()  # a collective broken by a dead peer is reported as that peer's loss
            traceback.print_exc()
            print(f"jkd {args.command}: internal error ({type(e).__name__}). This is a bug in jkd, not in "
                  "your input: please report it with the command and the traceback above.", file=sys.stderr)
            return 1, f"internal error ({type(e).__name__}: {str(e)[:200]})"
        from jkd.faults import DiskFullError, disk_full, is_disk_full

        # Any full disk that reaches here unexplained (a plain ENOSPC OSError from a write jkd does
        # not wrap, or orbax's RESOURCE_EXHAUSTED) still gets the one line with the folder and
        # --resume: CI once saw a bare "No space left on device" from the tmpfs test.
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            e = disk_full(Path(getattr(args, "run_dir", None) or "."), what="writing")
        from jkd.run_folder import ConfigMismatchError, mismatch_message

        # a changed config key is named by its flag too (student_steps (--steps))
        text = mismatch_message(e.path, e.diff, _config_flags(parser, args)) if isinstance(
            e, ConfigMismatchError) else _message(e)
        print(f"jkd {args.command}: error: {text}", file=sys.stderr)
        _quiet_on_the_way_out()
        return 2, text


# Config keys whose command-line flag has another name, by command (the rest share their name).
_KEY_DESTS = {
    "lm distill": {"student_steps": "steps", "train_file": "data", "test_file": "test", "unlabelled_file": "unlabelled",
                   "teacher_dir": "teacher", "student_optimizer": "lr", "teacher_optimizer": "lr",
                   "students": "student", "distillations": "mode", "include_baseline": "no_baseline"},
    "distill": {"student_epochs": "epochs", "student": "model", "student_optimizer": "lr",
                "distillations": "loss", "include_baseline": "no_baseline"},
    "train-teacher": {"teacher_epochs": "epochs", "teacher": "model", "teacher_optimizer": "lr"},
}


def _config_flags(parser: argparse.ArgumentParser, args) -> dict[str, str]:
    """Top-level config keys -> the flag that sets them in the command that ran."""
    command = args.command + (f" {args.lm_command}" if args.command == "lm" else "")
    sub = parser
    for name in command.split():
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    options = {a.dest: a.option_strings[-1] for a in sub._actions if a.option_strings}
    flags = {k: options[k] for k in options}
    flags.update({k: options[d] for k, d in _KEY_DESTS.get(command, {}).items() if d in options})
    return flags


# The commands that run over several processes (one per host); the others run on one.
_MULTI_PROCESS = ("demo", "run", "train-teacher", "distill")


def _join_processes(args) -> None:
    """Join the run's other processes when launched as one of several (see :mod:`jkd.hosts`)."""
    from jkd import hosts

    if not hasattr(args, "peer_timeout"):
        return  # a command without a run folder: one process
    launch = hosts.detect(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    if launch is None:
        return
    command = args.command + (f" {args.lm_command}" if args.command == "lm" else "")
    if args.command not in _MULTI_PROCESS or getattr(args, "auto", False):
        what = "jkd distill --auto" if getattr(args, "auto", False) else f"jkd {command}"
        raise ValueError(f"{what} runs on one process, but this one was launched as one of several "
                         f"({launch.source}); run it on one host, without --coordinator/--num-processes/--process-id. "
                         f"Commands that run over several hosts: {', '.join('jkd ' + c for c in _MULTI_PROCESS)}.")
    hosts.start(launch, peer_timeout_s=args.peer_timeout, echo=print)


def _quiet_on_the_way_out() -> None:
    """After a reported error (a full disk above all), orbax's writer threads and event loop may
    still fail while the process exits; their tracebacks would bury the one line that matters."""
    import logging
    import threading

    threading.excepthook = lambda args: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.getLogger("absl").setLevel(logging.CRITICAL)


def _message(e: BaseException) -> str:
    """One line: an OSError without its ``[Errno N]`` prefix, with its file and a hint."""
    if not isinstance(e, OSError) or not e.strerror:
        return str(e)
    text = e.strerror + (f": {e.filename}" if e.filename and str(e.filename) not in e.strerror else "")
    if e.errno in (13, 30) and "read-only" not in text:
        text += " (a read-only folder? choose another --run-dir or --out)"
    return text


def _dispatch(args, parser) -> int:
    from jkd import experiment as X

    if args.command == "models":
        from jkd.models import MODELS

        print("\n".join(sorted(MODELS)))
        return 0
    if args.command == "report":
        run_dir = Path(args.run_dir)
        summary = run_dir / "summary.json"
        if not summary.exists():
            raise FileNotFoundError(f"{summary} does not exist; is {run_dir} a finished run folder?")
        from jkd.evaluate import report

        data = json.loads(summary.read_text())
        print(report.write(run_dir, data["models"], title=data["title"], notes=data["notes"]))
        return 0
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "export":
        return _export(args)
    if args.command == "compress":
        return _compress(args)
    if args.command == "lm":
        from jkd import lm_experiment as LX

        if args.lm_command == "evaluate":
            return _lm_evaluate(args)
        if args.lm_command == "generate":
            return _lm_generate(args)
        if args.lm_command == "export":
            from jkd.export import export_lm_stablehlo

            model, tok = _lm_model(args.model)
            out = Path(args.out)
            if out.exists() and any(out.iterdir()):
                raise FileExistsError(f"{out} exists and is not empty; choose another --out.")
            export_lm_stablehlo(model, out)
            tok.save(out)
            print(f"wrote {out}/model.stablehlo (tokens, attention_mask -> logits) and the tokenizer")
            return 0
        if args.lm_command == "demo":
            cfg = apply_overrides(LX.demo_config(), args.set)
            LX.run(cfg, args.run_dir, resume=True, force=args.force, progress=not args.no_progress)
            return 0
        LX.run(_lm_config(args), args.run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
        return 0
    if args.command == "demo":
        cfg = apply_overrides(X.demo_config(), args.set)
        X.run(cfg, args.run_dir, resume=True, force=args.force, progress=not args.no_progress)
        print("\nYour own data? `jkd distill --auto --teacher-dir runs/demo/teacher/model --dataset DATA.npz "
              "--seeds 0,1,2` chooses the loss, T and KD weight on a validation split (never worse than the "
              "student alone there). Measured on this sample: ~3.7x the time of one distilled run "
              "(24 settings searched in one vmapped run per loss, then the choice and the student alone "
              "over 3 seeds).")
        print("More of the gap: `jkd run experiments/leaderboard/config.py` (~11 min here) compares every method; "
              "function matching (--loss fm: crops + mixup, the teacher's outputs only) at 160 epochs reached the "
              "teacher's accuracy there, against 96.27% for the student alone trained as long.")
        print(f"Ship a student: `jkd compress {args.run_dir}/soft_kd_t_8/seed0` prunes it (into a smaller dense "
              f"student too) and int8-quantizes it while the teacher keeps teaching (~35 s), and `jkd export ... --int8` "
              f"writes StableHLO/ONNX (and int8 ONNX) for raw images.")
        return 0
    if args.command == "run":
        module = load_config_file(args.config)
        cfg = apply_overrides(module.get_config(), args.set)
        cfg_path = Path(args.config).resolve()
        default = cfg_path.parent.name + ("" if cfg_path.stem == "config" else "_" + cfg_path.stem.removeprefix("config_"))
        run_dir = args.run_dir or str(Path("runs") / default)
        if hasattr(module, "main"):  # experiments that are more than one comparison (sweeps, toys)
            from jkd import hosts

            if hosts.active():
                raise ValueError(f"{args.config} is a custom experiment (its own main()), which runs on one "
                                 "process; run it on one host, without --coordinator/--num-processes/--process-id.")
            module.main(cfg, run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
        else:
            X.run(cfg, run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
        return 0
    common = dict(
        dataset=args.dataset, data_dir=args.data_dir, num_classes=args.num_classes, batch_size=args.batch_size,
        devices=args.devices, parallel=args.parallel,
    )
    if args.command == "train-teacher":
        kw = {} if args.crop_padding is None else {"teacher_crop_padding": args.crop_padding}
        cfg = X.ExperimentConfig(
            **common, **kw, teacher=_model_spec(args.model, args.model_option), teacher_epochs=args.epochs,
            teacher_optimizer=_optimizer(args.optimizer, args.lr, args.weight_decay),
            include_students=False, distillations=(), title=f"teacher {args.model} on {args.dataset}",
        )
    else:  # distill
        if args.auto and args.store_teacher_topk:
            raise ValueError("--store-teacher-topk is not supported with --auto (its grid includes DKD, which needs "
                             "the online teacher).")
        if args.auto:  # a bad grid is refused before anything is read or trained
            X.AutoGrid(losses=args.grid_losses, temperatures=args.grid_temperatures, kd_weights=args.grid_kd_weights).validate()
        kw = {} if args.crop_padding is None else {"student_crop_padding": args.crop_padding}
        cfg = X.ExperimentConfig(
            **common, **kw, teacher_dir=args.teacher_dir, teacher=_saved_teacher_spec(args.teacher_dir),
            student=_model_spec(args.model, args.model_option),
            student_epochs=args.epochs, student_optimizer=_optimizer(args.optimizer, args.lr, args.weight_decay),
            seeds=args.seeds, share_teacher_forward=args.share_teacher_forward,
            include_baseline=not args.no_baseline, val_fraction=args.val_fraction,
            store_teacher_topk=args.store_teacher_topk,
            distillations=(X.Distillation(f"{args.loss} KD", _objective(args), mixup_alpha=_mixup_alpha(args)),),
            title=f"{args.model} distilled ({args.loss}) on {args.dataset}",
        )
    if args.command == "distill" and args.auto:
        grid = X.AutoGrid(losses=args.grid_losses, temperatures=args.grid_temperatures, kd_weights=args.grid_kd_weights)
        X.run_auto(cfg, args.run_dir, grid=grid, calibrate=args.calibrate_teacher, resume=args.resume,
                   force=args.force, progress=not args.no_progress)
        return 0
    X.run(cfg, args.run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
    return 0


def _saved_teacher_spec(teacher_dir: str):
    """The model spec of a saved teacher (its architecture is read, not guessed)."""
    from jkd.saved import ModelSpec, load_saved_model

    _, _, meta = load_saved_model(teacher_dir)
    if meta["role"] != "teacher":
        raise ValueError(f"{teacher_dir} holds a {meta['role']} model, not a teacher.")
    return ModelSpec(meta["model"], tuple(tuple(o) for o in meta["options"]))


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
        raise ValueError(f"{path} is a run folder, not a model; give one of its students: "
                         f"{', '.join(students) or '(none saved yet)'}.")
    return path


def _export(args) -> int:
    from jkd import export as E
    from jkd.compress import quantization
    from jkd.saved import load_saved_model

    formats = _formats(args.format)
    if not formats:
        raise ValueError("no export format given; expected one or more of: stablehlo, onnx.")
    path = _student_dir(args.model_dir)
    graphdef, variables, meta = load_saved_model(path)
    if meta["role"] == "teacher":
        raise ValueError(f"{path} holds the teacher; jkd exports students only (the teacher stays with "
                         "training). Give a student folder, e.g. runs/demo/soft_kd_t_8/seed0.")
    out = Path(args.out) if args.out else path.parent / f"{path.name}_export"
    if args.int8:
        if "onnx" not in formats:
            raise ValueError("--int8 writes an int8 ONNX model: include onnx in --format.")
        from jkd.compress.job import MIN_CALIBRATION_IMAGES

        if args.calibration_images < MIN_CALIBRATION_IMAGES:
            raise ValueError(f"--calibration-images must be >= {MIN_CALIBRATION_IMAGES} for static int8 scales; "
                             f"got {args.calibration_images}.")
        calibration, (test_images, test_labels) = _calibration_images(meta, args.calibration_images, args.data_dir)
    with quantization.qwix_promotion():  # int8 students run qwix ops; float ones are unaffected
        paths = _export_and_check(graphdef, variables, meta, out, formats)
    if args.int8:
        import numpy as np

        q = E.quantize_onnx_int8(paths["onnx"], calibration, out / "model_int8.onnx")
        # The check that matters for int8: the test split, against the float model.
        ref = E.onnx_session(paths["onnx"]).run(None, {"images": test_images})[0]
        got = E.onnx_session(q).run(None, {"images": test_images})[0]
        print(f"onnx int8 (QDQ): {q} ({q.stat().st_size / 1024:.0f} KB); on the {len(test_labels)} test images: "
              f"accuracy {100 * float(np.mean(got.argmax(1) == test_labels)):.2f}% vs "
              f"{100 * float(np.mean(ref.argmax(1) == test_labels)):.2f}% in float, the same top-1 on "
              f"{100 * float(np.mean(ref.argmax(1) == got.argmax(1))):.2f}% ({len(calibration)} calibration images)")
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
    from jkd.compress.job import calibration_images

    test = P.reader(ds.split("test"), ds.spec.image_shape)
    return (calibration_images(P.reader(ds.split("train"), ds.spec.image_shape), n),
            test.read(np.arange(len(test))))


def _export_and_check(graphdef, variables, meta, out, formats):
    import numpy as np

    from jkd import export as E

    paths = E.export_model(graphdef, variables, meta, out, formats)
    # A self-check on a few random images: the artifact against the model in JAX.
    images = np.random.default_rng(0).integers(0, 256, (8, *meta["image_shape"]), dtype=np.uint8)
    reference = np.asarray(E.serving_function(graphdef, variables, mean=meta["mean"], std=meta["std"])(images))
    runs = {"stablehlo": lambda p: np.asarray(E.load_stablehlo(p)(images)),
            "onnx": lambda p: E.onnx_session(p).run(None, {"images": images})[0]}
    for fmt, p in paths.items():
        diff = float(np.max(np.abs(runs[fmt](p) - reference)))
        print(f"{fmt}: {p} ({p.stat().st_size / 1024:.0f} KB); max |logit difference| vs JAX on 8 images: {diff:.1e}")
    return paths


def _compress(args) -> int:
    from jkd.compress.job import CompressConfig, run_compress
    from jkd.train import AdamWConfig, objectives

    cfg = CompressConfig(
        sparsity=args.sparsity, per_layer=args.per_layer, structured_width=args.structured_width,
        prune_epochs=args.prune_epochs,
        qat_epochs=args.qat_epochs, quantize=not args.no_quantize, calibration_images=args.calibration_images,
        formats=_formats(args.format),
        objective=objectives.SoftKD(temperature=args.temperature, kd_weight=args.kd_weight, ce_weight=args.ce_weight),
        optimizer=AdamWConfig(learning_rate=args.lr, weight_decay=0.0, warmup_epochs=0.0),
        batch_size=args.batch_size, dataset=args.dataset, data_dir=args.data_dir)
    cfg.validate()  # bad settings are refused before anything is loaded
    path = _student_dir(args.model_dir)
    out = Path(args.out) if args.out else path.parent / f"{path.name}_compressed"
    run_compress(path, out, teacher_dir=args.teacher_dir, config=cfg, progress=not args.no_progress, force=args.force)
    print(f"\ncompression report: {out / 'compress_report.md'}")
    return 0


def _evaluate(args) -> int:
    import functools

    import jax

    from jkd.data import augment, load_dataset
    from jkd.data import pipeline as P
    from jkd.evaluate import metrics as M
    from jkd.evaluate.predict import predict
    from jkd.saved import check_dataset, load_saved_model
    from jkd.train import eval_step

    graphdef, variables, meta = load_saved_model(args.model_dir)
    ds = load_dataset(args.dataset or meta["dataset"], data_dir=args.data_dir)
    check_dataset(meta, ds.spec, where=f"the model in {args.model_dir}")
    view = functools.partial(augment.normalize, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, view_fn=view))
    logits, labels = predict(lambda b: fn(variables, b)["logits"], P.reader(ds.split("test"), ds.spec.image_shape),
                             batch_size=args.batch_size)
    rep = M.classification_report(logits, labels, ds.spec.num_classes)
    rep = {"model": meta["model"], "dataset": ds.spec.name, "test_accuracy": rep["accuracy"], "test_loss": rep["loss"], **rep}
    print(f"{meta['model']} on {ds.spec.name}: test accuracy {100 * rep['test_accuracy']:.2f}%, "
          f"loss {rep['test_loss']:.4f}, macro F1 {rep['macro_f1']:.4f}, ECE {rep['ece']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=2))
    return 0


def _lm_model(folder: str):
    from jkd.data.tokenizer import Tokenizer
    from jkd.models.hf import load_hf

    return load_hf(folder), Tokenizer.from_folder(folder)


def _lm_evaluate(args) -> int:
    from jkd.data import conversations as C
    from jkd.lm_evaluation import evaluate_model, test_cross_entropy

    convs = C.read_conversations(args.test)
    model, tok = _lm_model(args.model)
    turns = C.assistant_turns(tok, convs)
    kept = [t for t in turns if len(t.prompt) <= args.max_length]
    if not kept:
        raise ValueError(f"every test turn's prompt is longer than --max-length {args.max_length}; raise it.")
    metrics, _ = evaluate_model(model, kept, tok, max_new_tokens=args.max_new_tokens)
    enc = C.encode_conversations(tok, convs, max_length=args.max_length)
    pad = tok.pad_id if tok.pad_id is not None else 0
    metrics.update(test_cross_entropy=test_cross_entropy(model, enc, args.max_length, pad),
                   test_turns_skipped=len(turns) - len(kept), conversations_truncated=enc.truncated)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _lm_generate(args) -> int:
    from jkd.data.chat import encode_chat
    from jkd.train.sampler import SamplingConfig, generate

    model, tok = _lm_model(args.model)
    prompts = [encode_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True).ids for p in args.prompt]
    sampling = SamplingConfig(temperature=args.temperature) if args.temperature > 0 else SamplingConfig()
    out = generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, key=args.seed)
    for prompt, row in zip(args.prompt, out.rows()):
        print(f"> {prompt}\n{tok.decode(row, skip_special_tokens=True)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
