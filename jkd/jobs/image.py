"""The main job: train a teacher, the student alone and distilled students, evaluate, report.

One experiment is one :class:`ExperimentConfig` (an experiment's ``config.py`` returns it
from ``get_config()``); :func:`run` carries it out in a run folder::

    run_dir/config.json          the configuration (a rerun with the same one resumes)
    run_dir/log.jsonl            every train/eval record
    run_dir/tb/<model>/          TensorBoard event files (tensorboardX, no TensorFlow)
    run_dir/<model>/ckpt/        checkpoints of the model's training (resumable)
    run_dir/<model>/seed<k>/     the trained variables, saved once
    run_dir/<model>/metrics.json per-model metrics (per seed and mean)
    run_dir/summary.json, report.md, *.png
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from jkd.runtime import hosts
from jkd.data import augment, load_dataset
from jkd.data import pipeline as P
from jkd.evaluate import metrics as M
from jkd.evaluate import latency, plots, report
from jkd.evaluate.predict import accuracy_and_loss, predict
from jkd.models import model_stats
from jkd.models.zoo import check_model
from jkd.train import (
    AdamWConfig,
    SGDConfig,
    create_train_state,
    eval_step,
    freeze,
    make_optimizer,
    objectives,
    parallel,
    stack_states,
    stored,
    train_step_many,
    train_step_many_stored,
    unstack_state,
    with_objective_aux,
)
from jkd.train.optim import check_optimizer
from jkd.train.checkpoint import save_frozen
from jkd.train.steps import teacher_logits as teacher_forward
from jkd.train.loop import LoopConfig
from jkd.jobs.seeds import mean_std, verdict
from jkd.jobs.skeleton import Job, Run, Trained, get_teacher, open_run, run_job
from jkd.jobs.teacher import SAVED_TEACHER
from jkd.runtime.atomic import atomic_write
from jkd.runtime.run_folder import RunFolder, config_to_json, guarded_config, slug
from jkd.saved import ModelSpec, check_saved_model, load_saved_model, model_meta  # noqa: F401 - re-exported


@dataclasses.dataclass(frozen=True)
class Distillation:
    """One distilled-student setting: a display name and its objective (``objectives.SoftKD``, ...).

    ``crop_padding`` (default: the config's ``student_crop_padding``) and ``mixup_alpha`` (> 0:
    each view is mixed with the next example's, :func:`jkd.data.augment.mix_with_next`) set the
    view that this setting's students and the teacher see together; ``epochs`` and
    ``optimizer`` (default: the config's ``student_epochs`` and ``student_optimizer``) its
    schedule. Mixed views need an objective that does not read the labels
    (``objectives.FunctionMatching``).
    """

    name: str
    objective: object
    crop_padding: int | None = None
    mixup_alpha: float | None = None  # None (no mixup): earlier run folders, without the field, resume
    epochs: int | None = None
    optimizer: SGDConfig | AdamWConfig | None = None


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    dataset: str = "jkd_mnist_sample"
    data_dir: str | None = None
    num_classes: int | None = None  # user data: the class count (default: max label + 1,
    # every class present in train)
    teacher: ModelSpec = ModelSpec("mlp_2x1200")
    student: ModelSpec = ModelSpec("mlp_100")
    teacher_dir: str | None = None  # a saved teacher (skip teacher training)
    teacher_epochs: int = 20
    student_epochs: int = 40
    batch_size: int = 128
    teacher_optimizer: SGDConfig | AdamWConfig = AdamWConfig(learning_rate=1e-3, weight_decay=0.0, warmup_epochs=0.0)
    student_optimizer: SGDConfig | AdamWConfig = AdamWConfig(learning_rate=1e-3, weight_decay=0.0, warmup_epochs=0.0)
    teacher_crop_padding: int = 2
    student_crop_padding: int = 0
    flip: bool | None = None  # None: the dataset's default
    seeds: tuple[int, ...] = (0, 1, 2)
    share_teacher_forward: bool = False  # True: the seeds of a setting share one data order,
    # one augmented view and one teacher forward pass
    # (faster; the spread is then over initialisation only)
    distillations: tuple[Distillation, ...] = (
        Distillation("soft KD T=8", objectives.SoftKD(temperature=8.0, kd_weight=0.9, ce_weight=0.1)),
    )
    parallel: str = "single"  # "single" | "mesh" | "pmap"
    devices: int | None = None
    eval_every_epochs: int = 5
    val_fraction: float = 0.0  # > 0: a stratified validation split carved from train
    val_seed: int = 0
    include_baseline: bool = True  # train the student alone too
    include_students: bool = True  # False: train (and evaluate) the teacher only
    store_teacher_topk: int = 0  # > 0: the teacher's top-k logits are computed once and
    # soft KD runs without the teacher (fixed views only)
    title: str = "distillation run"

    def validate(self) -> None:
        if self.parallel not in ("single", "mesh", "pmap"):
            raise ValueError(f"parallel must be 'single', 'mesh' or 'pmap'; got {self.parallel!r}.")
        for field in ("teacher_epochs", "student_epochs", "batch_size", "eval_every_epochs"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1; got {getattr(self, field)}.")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1); got {self.val_fraction}.")
        if self.store_teacher_topk < 0:
            raise ValueError(f"store_teacher_topk must be >= 0 (0: online teacher); got {self.store_teacher_topk}.")
        if self.store_teacher_topk:
            stored.check_fixed_view(crop_padding=self.student_crop_padding, flip=bool(self.flip))
            other = [d.name for d in self.distillations if not isinstance(d.objective, objectives.SoftKD)]
            if other:
                raise ValueError(
                    f"stored teacher outputs support soft KD only; {', '.join(other)} need the "
                    "online teacher (set store_teacher_topk=0)."
                )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct; got {list(self.seeds)}.")
        for d in self.distillations:
            if d.crop_padding is not None and d.crop_padding < 0:
                raise ValueError(f"{d.name}: crop_padding must be >= 0; got {d.crop_padding}.")
            if d.epochs is not None and d.epochs < 1:
                raise ValueError(f"{d.name}: epochs must be >= 1; got {d.epochs}.")
            if d.optimizer is not None:
                check_optimizer(d.optimizer)
            alpha = d.mixup_alpha or 0.0
            if not (alpha >= 0 and np.isfinite(alpha)):
                raise ValueError(f"{d.name}: mixup_alpha must be a finite number >= 0 (0: no mixup); got {alpha}.")
            if alpha > 0 and getattr(d.objective, "reads_labels", True):
                raise ValueError(
                    f"{d.name}: a mixed view has no single label, and {type(d.objective).__name__} reads "
                    "the labels; use objectives.FunctionMatching (--loss fm) or mixup_alpha=0."
                )
            if getattr(d.objective, "batch_level", False) and self.parallel == "pmap":
                raise ValueError(
                    f"{d.name}: {type(d.objective).__name__} relates the examples of the whole batch, "
                    "which pmap splits over devices; use parallel 'mesh' (--parallel mesh)."
                )
            if alpha > 0 and self.parallel == "pmap":
                raise ValueError(
                    f"{d.name}: mixup pairs each example with the next of the global batch, which pmap "
                    "splits over devices; use parallel 'mesh' (--parallel mesh)."
                )
            if self.store_teacher_topk and (alpha > 0 or (d.crop_padding or 0) > 0):
                raise ValueError(
                    f"{d.name}: stored teacher outputs need fixed views (no crop, no mixup); set store_teacher_topk=0."
                )
        names = [d.name for d in self.distillations]
        if len(set(names)) != len(names):
            raise ValueError(f"distillation names must be distinct; got {names}.")
        if jax.process_count() > 1:  # a run over several processes (jkd.runtime.hosts): one mesh over all devices
            if self.parallel == "pmap":
                raise ValueError(
                    f"parallel 'pmap' runs on one process's devices; this run has {jax.process_count()} "
                    "processes: use parallel 'mesh' (--parallel mesh), which spans every host."
                )
            if self.devices not in (None, jax.device_count()):
                raise ValueError(
                    f"devices={self.devices} (--devices): a run over {jax.process_count()} processes uses "
                    f"all {jax.device_count()} devices of its hosts; leave --devices out."
                )
        elif self.devices is not None:
            if self.parallel == "single" and self.devices != 1:  # --devices 1 --parallel single: consistent
                raise ValueError(
                    f"devices={self.devices} (--devices) needs parallel 'mesh' or 'pmap' "
                    "(--parallel); 'single' runs on one device."
                )
            available = jax.local_device_count() if self.parallel == "pmap" else jax.device_count()
            if not 1 <= self.devices <= available:
                raise ValueError(
                    f"devices (--devices) must lie in [1, {available}]: this machine has "
                    f"{available} device(s) for parallel={self.parallel!r}; got {self.devices}."
                )
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes (--num-classes) must be >= 2; got {self.num_classes}.")
        if self.teacher_dir is None:
            check_model(self.teacher.name, dict(self.teacher.options))
            check_optimizer(self.teacher_optimizer)
        if self.include_students:
            check_model(self.student.name, dict(self.student.options))
            check_optimizer(self.student_optimizer)
            for d in self.distillations:
                objectives.check_objective(d.objective)


def demo_config() -> ExperimentConfig:
    """What ``make demo`` runs: the embedded MNIST sample, a 2x1200 teacher, a 784-100-10
    student alone and distilled with soft KD, hard KD and DKD, 3 seeds each (~100 s here)."""
    return ExperimentConfig(
        title="jkd demo: distillation on the embedded MNIST sample",
        distillations=(
            Distillation("soft KD T=8", objectives.SoftKD(temperature=8.0, kd_weight=0.9, ce_weight=0.1)),
            Distillation("hard KD", objectives.HardKD(kd_weight=0.5, ce_weight=0.5)),
            Distillation("DKD", objectives.DKD(tckd_weight=1.0, nckd_weight=8.0, temperature=4.0)),
        ),
    )


def _loss_name(objective) -> str:
    if isinstance(objective, objectives.CrossEntropy):
        return "cross-entropy"
    if isinstance(objective, objectives.TeacherTemperature):
        return f"{_loss_name(objective.base)} (teacher T={float(objective.temperature):.3g})"
    return type(objective).__name__


class ImageJob(Job):
    """The image job's parts for the skeleton (:mod:`jkd.jobs.skeleton`): its data and views, its
    teacher and students (``ModelSpec``\\ s of the zoo), accuracy and the classification metrics
    per seed, its report rows and figures."""

    def guarded_inputs(self) -> dict:
        return guarded_inputs(self.config)

    def prepare(self, run: Run) -> None:
        cfg = self.config
        # Process 0 prepares a dataset first (TFDS writes a shared cache), the others then read it.
        self.ds = hosts.primary_first(
            lambda: load_dataset(cfg.dataset, data_dir=cfg.data_dir, num_classes=cfg.num_classes),
            "jkd: dataset prepared",
        )
        spec = self.ds.spec
        self.train = P.reader(self.ds.split("train"), spec.image_shape)
        self.test = P.reader(self.ds.split("test"), spec.image_shape)
        self.val = None
        if cfg.val_fraction > 0:  # never the test split: carved from train, stratified by class
            tr, va = P.stratified_split(P.labels_of(self.train), fraction=cfg.val_fraction, seed=cfg.val_seed)
            self.train, self.val = P.Subset(self.train, tr), P.Subset(self.train, va)
        self.held_out = self.val if self.val is not None else self.test  # periodic evaluation
        self.steps_per_epoch = len(self.train) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(self.train)} training images.")
        self.flip = spec.flip if cfg.flip is None else cfg.flip
        self.eval_view = functools.partial(augment.normalize, mean=spec.mean, std=spec.std)
        self.view_name = f"normalize(mean={spec.mean}, std={spec.std})"
        self.bn_axis = parallel.AXIS if cfg.parallel == "pmap" else None
        self._log: dict[str, list[dict]] | None = None  # the run's log, read once trained (_histories)
        val = f" ({len(self.val)} of them held out for validation)" if self.val is not None else ""
        self.echo(
            f"dataset {spec.name}: {len(self.train) + (len(self.val) if self.val is not None else 0)} train{val} / "
            f"{len(self.test)} test images, {spec.num_classes} classes"
        )

    @property
    def cfg(self) -> ExperimentConfig:
        return self.config

    def view(self, crop_padding, mixup_alpha=0.0):
        s = self.ds.spec
        return functools.partial(
            augment.augment, mean=s.mean, std=s.std, crop_padding=crop_padding, flip=self.flip, mixup_alpha=mixup_alpha
        )

    def batches(self, seed):
        # Each process reads its share of every global batch; the order is the global one.
        return lambda start: P.train_batches(
            self.train,
            batch_size=self.cfg.batch_size,
            seed=seed,
            start_step=start,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_logits(self, graphdef, variables_list, split=None) -> list[np.ndarray]:
        """Logits of each variables set (eval mode) on ``split`` (default: test), all in one pass
        over the data; the labels are left in ``self.last_labels`` (and ``self.test_labels``
        for the test split). Several processes share the split and gather the logits."""
        fn = jax.jit(
            jax.vmap(functools.partial(eval_step, graphdef=graphdef, view_fn=self.eval_view), in_axes=(0, None))
        )
        stacked = stack_states([hosts.local(v) for v in variables_list])
        logits, self.last_labels = predict(
            lambda b: fn(stacked, b)["logits"],
            self.test if split is None else split,
            batch_size=self.cfg.batch_size,
            split=True,
        )
        if split is None:
            self.test_labels = self.last_labels
        return list(logits)

    # ---- the teacher -------------------------------------------------------------------------------

    def load_teacher(self, run: Run, source: Path) -> Trained:
        tg, teacher, meta = load_saved_model(source)
        check_saved_model(meta, self.cfg.teacher, self.ds.spec, where=str(source), role="teacher")
        self.echo(f"teacher {meta['model']}: loaded from {source}")
        return Trained("teacher", "teacher", "cross-entropy", tg, [teacher], self.cfg.teacher)

    def train_teacher(self, run: Run) -> Trained:
        cfg = self.cfg
        self.echo(f"teacher {cfg.teacher.name}: training {cfg.teacher_epochs} epochs")
        tg, states = _train_group(
            self,
            "teacher",
            cfg.teacher,
            objectives.CrossEntropy(),
            seeds=(0,),
            epochs=cfg.teacher_epochs,
            optimizer=cfg.teacher_optimizer,
            crop_padding=cfg.teacher_crop_padding,
        )
        return Trained("teacher", "teacher", "cross-entropy", tg, [freeze(states[0])], cfg.teacher)

    def save_teacher(self, run: Run, teacher: Trained, path: Path) -> None:
        save_frozen(path, teacher.weights[0], model_meta(self.cfg.teacher, self.ds.spec, "teacher"))

    # ---- the students ------------------------------------------------------------------------------

    def students(self, run: Run, teacher: Trained) -> Iterator[Trained]:
        cfg, echo = self.cfg, self.echo
        tg, frozen = teacher.graphdef, teacher.weights[0]
        groups = (
            [("student alone", "student_alone", Distillation("student alone", objectives.CrossEntropy()))]
            if cfg.include_baseline
            else []
        )
        # A setting without a teacher (objectives.CrossEntropy, e.g. the student alone on a longer
        # schedule) is a student alone: trained without the teacher and reported as such.
        groups += [
            (d.name, "distilled" if getattr(d.objective, "reads_teacher", True) else "student_alone", d)
            for d in cfg.distillations
        ]
        if not cfg.include_students:
            groups = []
        outputs = None
        if cfg.store_teacher_topk and any(role == "distilled" for _, role, _ in groups):
            stored.check_fixed_view(crop_padding=cfg.student_crop_padding, flip=self.flip)
            forward = jax.jit(lambda images: teacher_forward(tg, frozen, self.eval_view(images)))
            t0 = time.perf_counter()
            outputs = stored.store_teacher_outputs(
                forward,
                self.train,
                k=cfg.store_teacher_topk,
                view=self.view_name,
                batch_size=cfg.batch_size,
                progress=self.progress,
            )
            echo(
                f"teacher outputs stored once: top-{cfg.store_teacher_topk} of {len(outputs)} examples in bf16 "
                f"({outputs.nbytes() / 1024:.0f} KB, {time.perf_counter() - t0:.1f} s)"
            )
        for name, role, d in groups:
            epochs = d.epochs or cfg.student_epochs
            echo(f"{name}: {len(cfg.seeds)} seeds of {cfg.student.name} in one vmapped step, {epochs} epochs")
            g, states = _train_group(
                self,
                name,
                cfg.student,
                d.objective,
                seeds=cfg.seeds,
                epochs=epochs,
                optimizer=d.optimizer or cfg.student_optimizer,
                crop_padding=cfg.student_crop_padding if d.crop_padding is None else d.crop_padding,
                mixup_alpha=d.mixup_alpha or 0.0,
                teacher=None if role == "student_alone" else frozen,
                teacher_graphdef=tg,
                stored_outputs=outputs if role == "distilled" else None,
                shared=cfg.share_teacher_forward,
            )
            yield Trained(
                name, role, _loss_name(d.objective), g, [freeze(s) for s in states], cfg.student, {"epochs": epochs}
            )

    # ---- measuring and reporting -------------------------------------------------------------------

    def _histories(self, run: Run) -> dict[str, list[dict]]:
        """The run's log by model, read once: measuring and reporting come after all training."""
        if self._log is None:
            self._log = run.folder.read_log()
        return self._log

    def measure(self, run: Run, t: Trained) -> list[dict]:
        cfg, spec = self.cfg, self.ds.spec
        logits = self.eval_logits(t.graphdef, t.weights)
        labels = self.test_labels
        if t.role == "teacher":
            self.teacher_logits = logits[0]
        per_seed = [
            M.classification_report(lg, labels, spec.num_classes, None if t.role == "teacher" else self.teacher_logits)
            for lg in logits
        ]
        model_dir = run.path / slug(t.name)
        for i, v in enumerate(t.weights):
            target = model_dir / f"seed{i}"
            if t.role != "teacher" and not target.exists():
                save_frozen(target, v, model_meta(t.model, spec, t.role))
        evals = [h for h in self._histories(run).get(t.name, []) if h.get("event") == "eval"]
        accs = [m["accuracy"] for m in per_seed]
        stats = model_stats(t.model.build(spec.num_classes, spec.image_shape, 0), spec.image_shape)
        metrics = {
            "name": t.name,
            "role": t.role,
            "loss": t.loss,
            "model": t.model.name,
            "test_accuracy": float(np.mean(accs)),
            "test_accuracy_per_seed": accs,
            "test_loss": float(np.mean([m["loss"] for m in per_seed])),
            "last_test_accuracy": float(np.mean(accs)),
            # Periodic evaluations run on the validation split when there is one; then the
            # test split is measured once, at the end, and "best" is that final figure.
            "best_test_accuracy": (
                max([e["test_accuracy"] for e in evals] + [float(np.mean(accs))])
                if self.val is None
                else float(np.mean(accs))
            ),
            "params": stats.params,
            "flops": stats.flops,
            "per_seed": per_seed,
            **{k: per_seed[0][k] for k in ("precision", "recall", "f1", "macro_f1", "auc_ovr", "macro_auc_ovr", "ece")},
        }
        if self.val is not None and evals:
            metrics["best_val_accuracy"] = max(e["val_accuracy"] for e in evals)
        if t.role != "teacher":
            metrics["teacher_agreement"] = float(np.mean([m["teacher_agreement"] for m in per_seed]))
        if run.primary:  # one metrics file and one set of plots, whatever the number of processes
            model_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(model_dir / "metrics.json", json.dumps(metrics, indent=2))
            plots.confusion(
                per_seed[0]["confusion_matrix"],
                run.path / f"confusion_{slug(t.name)}.png",
                f"{t.name} (seed {cfg.seeds[0] if t.role != 'teacher' else 0})",
            )
            plots.roc(logits[0], labels, run.path / f"roc_{slug(t.name)}.png", f"ROC, one vs rest: {t.name}")
        return per_seed

    def entry(self, run: Run, t: Trained, per_seed: list[dict]) -> dict:
        cfg, spec, shape = self.cfg, self.ds.spec, self.ds.spec.image_shape
        size = _dir_bytes(
            Path(cfg.teacher_dir)
            if (t.role == "teacher" and cfg.teacher_dir)
            else run.path / SAVED_TEACHER
            if t.role == "teacher"
            else run.path / slug(t.name) / "seed0"
        )
        stats = model_stats(t.model.build(spec.num_classes, shape, 0), shape)
        accs = [m["accuracy"] for m in per_seed]
        return {
            "name": t.name,
            "role": t.role,
            "loss": t.loss,
            "model": t.model.name,
            "test_accuracy_per_seed": accs,
            **mean_std([{"test_accuracy": a} for a in accs]),
            "params": stats.params,
            "flops": stats.flops,
            "size_bytes": size,
            "seconds_per_epoch": _seconds_per_epoch(self._histories(run).get(t.name, []), len(self.train)),
            "epochs": (None if cfg.teacher_dir else cfg.teacher_epochs) if t.role == "teacher" else t.info["epochs"],
            # Timed on process 0 only: it alone writes the report.
            "latency_ms": _latency_ms(t.graphdef, t.weights[0], cfg.batch_size, shape, self.eval_view)
            if run.primary
            else None,
        }

    def report(self, run: Run, entries: list[dict]) -> report.Report:
        cfg = self.cfg
        held = "val" if self.val is not None else "test"
        curves = {
            n: [
                {"epoch": h["epoch"], "train_loss": h["loss"], "train_accuracy": h["accuracy"]}
                for h in hs
                if h.get("event") == "train"
            ]
            + [
                {
                    "epoch": h["epoch"],
                    "held_out_accuracy": h[f"{held}_accuracy"],
                    "held_out_loss": float(np.mean(h[f"{held}_loss_per_seed"])),
                }
                for h in hs
                if h.get("event") == "eval"
            ]
            for n, hs in self._histories(run).items()
        }
        _gap_and_cost(entries)
        protocol = (
            "seeds share one data order, augmented view and teacher pass, so the spread is over initialisation only"
            if cfg.share_teacher_forward
            else "each seed has its own initialisation, data order and augmentation"
        )
        seeds_note = f"{len(cfg.seeds)} seeds per student setting ({protocol}); " if len(entries) > 1 else ""
        hosts_note = (
            f"; trained by {jax.process_count()} processes on {jax.device_count()} devices, the latency "
            "measured on process 0"
            if jax.process_count() > 1
            else ""
        )
        notes = [
            f"{seeds_note}latency is the median of up to 20 eval batches of {cfg.batch_size} (2 s per "
            "model at most) on "
            f"{jax.devices()[0].platform}; total time {time.perf_counter() - run.started:.0f} s{hosts_note}."
        ]
        for e in entries:
            alone = reference_alone(e, entries)
            if e["role"] == "distilled" and alone is not None:
                which = "the student alone" if alone is _first_alone(entries) else f"{alone['name']}"
                gap = (
                    f"; it closes {100 * e['gap_closed']:.0f}% of the teacher-student gap" if "gap_closed" in e else ""
                )
                notes.append(
                    verdict(
                        e,
                        alone,
                        "test_accuracy",
                        label="test accuracy",
                        other=which,
                        scale=100,
                        digits=2,
                        unit=" points",
                    )
                    + gap
                    + "."
                )
        plots.curves(curves, run.path / "curves.png", held_out="validation" if self.val is not None else "test")
        plots.accuracy_vs_size(entries, run.path / "accuracy_vs_size.png")
        figures = (
            ["curves.png", "accuracy_vs_size.png"]
            + sorted(p.name for p in run.path.glob("confusion_*.png"))
            + sorted(p.name for p in run.path.glob("roc_*.png"))
        )
        return report.Report(cfg.title, report.table(entries), notes, [(f, f) for f in figures])


def _columns(streams):
    """K batch streams -> one stream of ``[B, K, ...]`` batches (student k's batch in column k)."""
    for batches in zip(*streams):
        yield {key: np.stack([b[key] for b in batches], axis=1) for key in batches[0]}


def _train_group(
    r: ImageJob,
    name: str,
    spec: ModelSpec,
    objective,
    *,
    seeds,
    epochs,
    optimizer,
    crop_padding,
    mixup_alpha=0.0,
    teacher=None,
    teacher_graphdef=None,
    stored_outputs=None,
    shared: bool = True,
):
    """Train len(seeds) copies of ``spec`` in one vmapped step; returns ``(graphdef, [state per
    seed])``; records go to the run's log. ``objective`` is one objective for all, or a list
    of one objective per seed (a sweep of temperatures or weights).

    ``shared``: the students see one data order (the first seed's), one augmented view and one
    teacher forward pass (fast; they differ only in initialisation and objective). Otherwise each
    seed has its own order, view and teacher pass: K independent runs in one step."""
    cfg, shape, k = r.cfg, r.ds.spec.image_shape, len(seeds)
    per_student = list(objective) if isinstance(objective, (list, tuple)) else [objective] * k
    if len(per_student) != k:
        raise ValueError(f"{len(per_student)} objectives for {k} students; give one per seed.")
    per_student = [objectives.per_epoch(o, r.steps_per_epoch) for o in per_student]  # e.g. DKD's warm-up
    total = epochs * r.steps_per_epoch
    tx = make_optimizer(optimizer, steps_per_epoch=r.steps_per_epoch, total_steps=total)
    made = [create_train_state(spec.build(r.ds.spec.num_classes, shape, s, r.bn_axis), tx, seed=s) for s in seeds]
    graphdef = made[0][0]
    example = r.eval_view(np.zeros((2, *shape), np.uint8))
    states = stack_states(
        [
            with_objective_aux(
                st,
                o,
                tx,
                graphdef=graphdef,
                teacher_graphdef=teacher_graphdef,
                teacher=teacher,
                example=example,
                seed=s,
            )  # CRD's heads and memory
            for (_, st), o, s in zip(made, per_student, seeds)
        ]
    )
    shared = shared or k == 1
    attach = (
        (lambda stream: stored.with_teacher_targets(stream, stored_outputs, source=r.view_name))
        if stored_outputs is not None
        else (lambda stream: stream)
    )
    if shared:
        batches = lambda start: attach(r.batches(seed=seeds[0])(start))  # noqa: E731
    else:
        batches = lambda start: _columns([attach(r.batches(seed=s)(start)) for s in seeds])  # noqa: E731
    if stored_outputs is not None:  # soft KD from the stored top-k: no teacher forward pass
        per_student = [
            objectives.StoredSoftKD(temperature=o.temperature, kd_weight=o.kd_weight, ce_weight=o.ce_weight)
            for o in per_student
        ]
        step = functools.partial(
            train_step_many_stored,
            graphdef=graphdef,
            tx=tx,
            view_fn=r.view(crop_padding),
            per_student_batches=not shared,
        )
        teacher = None
    else:
        step = functools.partial(
            train_step_many,
            graphdef=graphdef,
            tx=tx,
            view_fn=r.view(crop_padding, mixup_alpha),
            teacher_graphdef=teacher_graphdef,
            per_student_batches=not shared,
        )
    objs = objectives.stack(per_student) if jax.tree.leaves(per_student[0]) else per_student[0]
    eval_fn = jax.jit(jax.vmap(functools.partial(eval_step, graphdef=graphdef, view_fn=r.eval_view), in_axes=(0, None)))

    def evaluate(st):
        st = hosts.local(st)  # each process evaluates its share of the split, locally, then all gather
        logits, labels = predict(lambda b: eval_fn(st, b)["logits"], r.held_out, batch_size=cfg.batch_size, split=True)
        acc, loss = accuracy_and_loss(logits, labels)  # [K] each
        # Named for the split measured: "val_*" only for a validation split, "test_*" otherwise.
        split = "val" if r.val is not None else "test"
        return {
            f"{split}_accuracy": float(acc.mean()),
            f"{split}_accuracy_per_seed": acc.tolist(),
            f"{split}_loss_per_seed": loss.tolist(),
        }

    states = r.run.train_group(
        name,
        r.run.runner(step),
        states,
        objs,
        teacher,
        batches=batches,
        evaluate=evaluate,
        config=LoopConfig(
            num_steps=total,
            save_every=r.steps_per_epoch,
            eval_every=cfg.eval_every_epochs * r.steps_per_epoch,
            progress=r.progress,
            label=name,
        ),
        annotate=lambda rec: {**rec, "epoch": rec["step"] / r.steps_per_epoch},
    )
    return graphdef, [hosts.local(unstack_state(states, i)) for i in range(k)]


def _latency_ms(graphdef, variables, batch_size, shape, view) -> float:
    fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, view_fn=view))
    b = {"image": np.zeros((batch_size, *shape), np.uint8), "label": np.zeros(batch_size, np.int32)}
    return latency.median_ms(fn, variables, b)


def _seconds_per_epoch(history: list[dict], train_examples: int) -> float | None:
    """Training time of one epoch from the log's throughput (the median record: compilation and
    a resume do not count), or None (a saved teacher, no records)."""
    rates = [h["images_per_s"] for h in history if h.get("event") == "train" and h.get("images_per_s")]
    return float(train_examples / np.median(rates)) if rates else None


def reference_alone(entry: dict, entries: list[dict]) -> dict | None:
    """The student alone a distilled entry is compared with: the one trained as many epochs if
    there is one (patience is not credited to the teacher), else the first student alone."""
    alones = [e for e in entries if e["role"] == "student_alone"]
    same = [e for e in alones if e.get("epochs") == entry.get("epochs")]
    return (same or alones or [None])[0]


def _first_alone(entries: list[dict]) -> dict | None:
    return next((e for e in entries if e["role"] == "student_alone"), None)


def _gap_and_cost(entries: list[dict]) -> None:
    """Add to each distilled entry the fraction of the teacher-student gap it closes,
    ``(acc - alone) / (teacher - alone)`` on mean test accuracy (1: the teacher's accuracy;
    ``alone``: :func:`reference_alone`, named in ``gap_reference``), and its training time
    per epoch relative to the first student alone's."""
    teacher = next((e for e in entries if e["role"] == "teacher"), None)
    first = _first_alone(entries)
    for e in entries:
        alone = reference_alone(e, entries)
        if e["role"] != "distilled" or alone is None:
            continue
        gap = None if teacher is None else teacher["test_accuracy_mean"] - alone["test_accuracy_mean"]
        if gap is not None and gap > 0:
            e["gap_closed"] = (e["test_accuracy_mean"] - alone["test_accuracy_mean"]) / gap
            e["gap_reference"] = alone["name"]
        if e.get("seconds_per_epoch") and first.get("seconds_per_epoch"):
            e["epoch_cost_vs_alone"] = e["seconds_per_epoch"] / first["seconds_per_epoch"]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def guarded_inputs(cfg: ExperimentConfig) -> dict:
    """The paths the run reads whose contents join its guard: a dataset file or folder, the teacher."""
    return {"dataset": cfg.dataset, "teacher_dir": cfg.teacher_dir}


def run(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Carry out ``cfg`` in ``run_dir``; returns the summary (also in ``summary.json``).

    The run folder's rule (:mod:`jkd.runtime.run_folder`): the same configuration resumes with
    ``resume=True``; another one is refused, naming the keys that differ (``force=True``
    deletes the old run first); a run that failed before training began is simply rerun.
    """
    return run_job(ImageJob(cfg), run_dir, resume=resume, force=force, progress=progress, echo=echo)


def run_sweep(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    temperatures,
    kd_weights,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Soft KD over a grid of temperatures x KD weights, all students in one vmapped run.

    Every student starts from the same initialisation (``seed``) and sees the same batches, so
    the grid isolates the effect of ``T`` and ``kd_weight`` (``ce_weight = 1 - kd_weight``;
    ``kd_weight = 0`` is the student alone). Writes ``sweep.json`` and ``sweep_heatmap.png``.
    """
    temperatures, kd_weights = [float(t) for t in temperatures], [float(w) for w in kd_weights]
    if not temperatures or not kd_weights:
        raise ValueError("the grid needs at least one temperature and one kd_weight.")
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0; got {temperatures}.")
    if any(not 0 <= w <= 1 for w in kd_weights):
        raise ValueError(f"kd_weights must lie in [0, 1]; got {kd_weights}.")
    cfg.validate()
    run_dir = Path(run_dir)
    sweep = {"temperatures": temperatures, "kd_weights": kd_weights, "seed": seed}
    r = ImageJob(cfg)
    with open_run(
        r,
        run_dir,
        resume=resume,
        force=force,
        progress=progress,
        echo=echo,
        config={**guarded_config(cfg, guarded_inputs(cfg)), "sweep": sweep},
    ) as claimed:
        trained = get_teacher(r, claimed)
        tg, teacher, echo = trained.graphdef, trained.weights[0], claimed.echo
        grid = [(t, w) for t in temperatures for w in kd_weights]
        objs = [objectives.SoftKD(temperature=t, kd_weight=w, ce_weight=1.0 - w) for t, w in grid]
        echo(
            f"sweep: {len(grid)} students of {cfg.student.name} ({len(temperatures)} T x {len(kd_weights)} "
            f"KD weights) in one vmapped step, {cfg.student_epochs} epochs"
        )
        t0 = time.perf_counter()
        g, states = _train_group(
            r,
            "sweep",
            cfg.student,
            objs,
            seeds=[seed] * len(grid),
            epochs=cfg.student_epochs,
            optimizer=cfg.student_optimizer,
            crop_padding=cfg.student_crop_padding,
            teacher=teacher,
            teacher_graphdef=tg,
        )
        seconds = time.perf_counter() - t0
        logits = r.eval_logits(g, [freeze(s) for s in states])
        acc = np.array([float((lg.argmax(1) == r.test_labels).mean()) for lg in logits]).reshape(
            len(temperatures), len(kd_weights)
        )
        plots.heatmap(
            100 * acc,
            [f"T={t:g}" for t in temperatures],
            [f"{w:g}" for w in kd_weights],
            run_dir / "sweep_heatmap.png",
            title=f"{cfg.student.name}: test accuracy (%) by T and KD weight",
            row_label="temperature",
            col_label="kd_weight (ce_weight = 1 - kd_weight)",
        )
        best = np.unravel_index(np.argmax(acc), acc.shape)
        result = {
            "temperatures": temperatures,
            "kd_weights": kd_weights,
            "test_accuracy": acc.tolist(),
            "best": {
                "temperature": temperatures[best[0]],
                "kd_weight": kd_weights[best[1]],
                "test_accuracy": float(acc[best]),
            },
            "students": len(grid),
            "train_seconds": seconds,
        }
        atomic_write(run_dir / "sweep.json", json.dumps(result, indent=2))
        rows = [
            "| T \\ kd_weight | " + " | ".join(f"{w:g}" for w in kd_weights) + " |",
            "|---|" + "---|" * len(kd_weights),
        ]
        rows += [
            f"| {t:g} | " + " | ".join(f"{100 * a:.2f}" for a in acc[i]) + " |" for i, t in enumerate(temperatures)
        ]
        echo("\n".join(rows))
        echo(
            f"best: T={result['best']['temperature']:g}, kd_weight={result['best']['kd_weight']:g} "
            f"({100 * result['best']['test_accuracy']:.2f}%); {len(grid)} students trained in {seconds:.0f} s"
        )
        return result


def _auto_objective(loss: str, temperature: float, kd_weight: float):
    """The grid's objectives; ``ce_weight = 1 - kd_weight`` for both families."""
    if loss == "soft":
        return objectives.SoftKD(temperature=temperature, kd_weight=kd_weight, ce_weight=1.0 - kd_weight)
    return objectives.DKD(
        tckd_weight=1.0, nckd_weight=8.0, temperature=temperature, kd_weight=kd_weight, ce_weight=1.0 - kd_weight
    )


AUTO_LOSSES = ("soft", "dkd")


@dataclasses.dataclass(frozen=True)
class AutoGrid:
    """The settings ``run_auto`` tries: every loss x temperature x KD weight. ``kd_weight=0``
    is the student alone, so the choice is never worse than no distillation on validation."""

    losses: tuple[str, ...] = AUTO_LOSSES
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    kd_weights: tuple[float, ...] = (0.0, 0.5, 0.9)

    def validate(self) -> None:
        unknown = [l for l in self.losses if l not in AUTO_LOSSES]
        if unknown or not self.losses:
            raise ValueError(
                f"unknown loss(es) {unknown or '(none given)'} in the grid; known: {', '.join(AUTO_LOSSES)}."
            )
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError(f"grid temperatures must be > 0; got {list(self.temperatures)}.")
        if not self.kd_weights or any(not 0 <= w <= 1 for w in self.kd_weights):
            raise ValueError(f"grid kd_weights must lie in [0, 1]; got {list(self.kd_weights)}.")
        if 0.0 not in self.kd_weights:
            raise ValueError(
                "grid kd_weights must include 0 (the student alone), so the choice can "
                "never be worse than no distillation on validation data."
            )


def choose_setting(val_acc: dict[str, np.ndarray], grid: AutoGrid, validation_examples: int) -> dict:
    """``--auto``'s rule, on validation accuracies ``val_acc[loss][i_temperature, j_kd_weight]``.

    The highest validation accuracy wins; ties go to the smaller KD weight. A distilled
    setting replaces the student alone (``kd_weight=0``) only if it beats it by more than one
    binomial standard error of the alone's accuracy, ``sqrt(a (1 - a) / n)``: on a small
    validation split a gain of a few images is noise, and "never worse than no distillation"
    must hold on test too.
    """
    best = max(
        (
            (float(val_acc[l][i, j]), -grid.kd_weights[j], l, grid.temperatures[i], grid.kd_weights[j])
            for l in grid.losses
            for i in range(len(grid.temperatures))
            for j in range(len(grid.kd_weights))
        )
    )
    alone_val = float(val_acc[grid.losses[0]][:, list(grid.kd_weights).index(0.0)].max())
    margin = float(np.sqrt(alone_val * (1 - alone_val) / validation_examples))
    if best[0] - alone_val <= margin:
        best = (alone_val, 0.0, grid.losses[0], grid.temperatures[0], 0.0)
    acc, _, loss, temp, weight = best
    return {
        "loss": loss,
        "temperature": temp,
        "kd_weight": weight,
        "ce_weight": 1.0 - weight,
        "val_accuracy": acc,
        "student_alone_val_accuracy": alone_val,
        "required_gain": margin,
        "validation_examples": int(validation_examples),
    }


def run_auto(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    grid: AutoGrid = AutoGrid(),
    calibrate: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Choose the distillation setting on validation data, then train it fully and report.

    1. Refuse a bad grid before any training. 2. Carve a stratified validation split from
    train (``cfg.val_fraction``, 0.1 if unset). 3. Get the teacher; optionally calibrate it by
    temperature scaling on the validation split (ECE before/after recorded). 4. Train every
    setting of the grid, one vmapped run per loss (first seed). 5. Pick the best by validation
    accuracy; it replaces the student alone only if it gains more than one binomial standard
    error of the alone's validation accuracy. 6. Train the choice and the student alone over all
    seeds (``run``) and report test accuracy of both. Writes ``auto.json`` and a heat-map per loss.
    """
    grid.validate()
    cfg = dataclasses.replace(cfg, val_fraction=cfg.val_fraction or 0.1, distillations=())
    cfg.validate()
    run_dir = Path(run_dir)
    auto = {"grid": dataclasses.asdict(grid), "calibrate": calibrate}
    top = RunFolder(
        run_dir, {**guarded_config(cfg, guarded_inputs(cfg)), "auto": auto}, resume=resume, force=force, echo=echo
    )
    try:
        return _run_auto(top, cfg, run_dir, grid=grid, calibrate=calibrate, progress=progress, echo=echo)
    finally:
        top.close()


def _run_auto(
    top: RunFolder,
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    grid: AutoGrid,
    calibrate: bool,
    progress: bool,
    echo: Callable[[str], None],
) -> dict:
    search_dir = run_dir / "search"
    # The top folder's guard covers what is below it: the search and the final runs resume.
    r = ImageJob(cfg)
    with open_run(r, search_dir, resume=True, progress=progress, echo=echo, config=config_to_json(cfg)) as search:
        top.begin()
        t_search = time.perf_counter()
        trained = get_teacher(r, search)
        tg, teacher = trained.graphdef, trained.weights[0]
        teacher_val = r.eval_logits(tg, [teacher], r.val)[0]
        val_labels = r.last_labels
        calibration = {"teacher_val_ece_before": M.expected_calibration_error(M.softmax(teacher_val), val_labels)}
        t_cal = 1.0
        if calibrate:
            t_cal = M.fit_temperature(teacher_val, val_labels)
            calibration.update(
                temperature=t_cal,
                teacher_val_ece_after=M.expected_calibration_error(M.softmax(teacher_val / t_cal), val_labels),
            )
            echo(
                f"teacher calibration: T={t_cal:.3f}, validation ECE {calibration['teacher_val_ece_before']:.4f} -> "
                f"{calibration['teacher_val_ece_after']:.4f}"
            )

        def wrap(obj):
            return objectives.TeacherTemperature(obj, t_cal) if calibrate else obj

        settings = [(t, w) for t in grid.temperatures for w in grid.kd_weights]
        val_acc = {}
        for loss in grid.losses:
            objs = [wrap(_auto_objective(loss, t, w)) for t, w in settings]
            echo(f"search {loss}: {len(settings)} students in one vmapped step, {cfg.student_epochs} epochs")
            g, states = _train_group(
                r,
                f"search {loss}",
                cfg.student,
                objs,
                seeds=[cfg.seeds[0]] * len(settings),
                epochs=cfg.student_epochs,
                optimizer=cfg.student_optimizer,
                crop_padding=cfg.student_crop_padding,
                teacher=teacher,
                teacher_graphdef=tg,
            )
            logits = r.eval_logits(g, [freeze(s) for s in states], r.val)
            acc = np.array([float((lg.argmax(1) == r.last_labels).mean()) for lg in logits])
            val_acc[loss] = acc.reshape(len(grid.temperatures), len(grid.kd_weights))
            plots.heatmap(
                100 * val_acc[loss],
                [f"T={t:g}" for t in grid.temperatures],
                [f"{w:g}" for w in grid.kd_weights],
                run_dir / f"auto_heatmap_{loss}.png",
                title=f"{loss}: validation accuracy (%)",
                row_label="temperature",
                col_label="kd_weight (ce_weight = 1 - kd_weight)",
            )
        search_seconds = time.perf_counter() - t_search
    choice = {**choose_setting(val_acc, grid, len(val_labels)), "teacher_temperature": t_cal}
    loss, temp, weight = choice["loss"], choice["temperature"], choice["kd_weight"]
    echo(
        f"chosen on validation: {loss}, T={temp:g}, kd_weight={weight:g} ({100 * choice['val_accuracy']:.2f}% vs "
        f"{100 * choice['student_alone_val_accuracy']:.2f}% for the student alone; a gain must exceed "
        f"{100 * choice['required_gain']:.2f} points)"
    )
    name = f"auto: {loss} T={temp:g} kd={weight:g}" if weight > 0 else "auto: no distillation (kd_weight=0)"
    final_cfg = dataclasses.replace(
        cfg,
        teacher_dir=str(search_dir / SAVED_TEACHER) if not cfg.teacher_dir else cfg.teacher_dir,
        distillations=(Distillation(name, wrap(_auto_objective(loss, temp, weight))),),
        include_baseline=True,
        title=f"{cfg.title} (automatic settings)",
    )
    t_final = time.perf_counter()
    summary = run(final_cfg, run_dir / "final", resume=True, progress=progress, echo=echo)
    final_seconds = time.perf_counter() - t_final
    by_role = {m["role"]: m for m in summary["models"]}
    chosen_metrics = run_dir / "final" / slug(name) / "metrics.json"
    m = json.loads(chosen_metrics.read_text())
    m["auto_choice"] = choice
    atomic_write(chosen_metrics, json.dumps(m, indent=2))
    result = {
        "grid": dataclasses.asdict(grid),
        "val_accuracy": {l: v.tolist() for l, v in val_acc.items()},
        "choice": choice,
        "calibration": calibration,
        "test_accuracy_choice": by_role["distilled"]["test_accuracy_per_seed"],
        "test_accuracy_student_alone": by_role["student_alone"]["test_accuracy_per_seed"],
        "settings_searched": len(settings) * len(grid.losses),
        "search_seconds": search_seconds,
        "final_seconds": final_seconds,
    }
    atomic_write(run_dir / "auto.json", json.dumps(result, indent=2))
    a, c = np.array(result["test_accuracy_student_alone"]), np.array(result["test_accuracy_choice"])
    echo(
        f"test accuracy: chosen {100 * c.mean():.2f} +- {100 * c.std():.2f}, student alone "
        f"{100 * a.mean():.2f} +- {100 * a.std():.2f}; search of {result['settings_searched']} settings took "
        f"{search_seconds:.0f} s (teacher included), the final {len(cfg.seeds)}-seed runs {final_seconds:.0f} s"
    )
    return result
