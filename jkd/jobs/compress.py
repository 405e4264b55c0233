"""``jkd compress``: prune and quantize a saved student (the teacher keeps teaching), export
it, and compare everything side by side with the teacher.

Out folder (rerunning the same command resumes; each stage is saved once)::

    out/config.json              the settings (another configuration is refused)
    out/pruned/model             the pruned student (a saved jkd model: evaluate/export it)
    out/pruned/ckpt              checkpoints of the pruning run (resumable)
    out/structured/model         the structurally pruned student: a smaller dense model (+ ckpt)
    out/int8_weights/model, out/int8_static/model, out/int8_qat/model (+ ckpt)
    out/export/                  model.stablehlo, model.onnx, preprocessing.json of the student
    out/export_int8/             model.stablehlo (int8 weights), model.onnx (int8 QDQ, for onnxruntime)
    out/export_structured/       the structured student: model.onnx, and model_int8.onnx (QDQ)
    out/compress_summary.json, out/compress_report.md

Latency is measured where each row is deployed: jax (XLA, what the StableHLO artifact runs in) for
the models, onnxruntime for ONNX files; at batch 1 (an edge request) and at batch 128.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jkd import export as E
from jkd.compress import pruning, quantization as Q, structured
from jkd.data import augment, load_dataset
from jkd.data import pipeline as P
from jkd.evaluate import latency
from jkd.evaluate.predict import predict
from jkd.models import create_model, model_stats
from jkd.jobs.group import train_group
from jkd.jobs.teacher import SAVED_TEACHER
from jkd.runtime.run_folder import RunFolder, guarded_config
from jkd.saved import check_dataset, load_saved_model
from jkd.train import AdamWConfig, TrainState, freeze, freeze_model, make_optimizer, objectives, parallel, train_step
from jkd.train.checkpoint import save_frozen
from jkd.train.state import split_model
from jkd.train.loop import LoopConfig


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """Settings of one compression run; ``sparsity=0`` skips pruning, ``quantize=False``
    skips int8, ``qat_epochs=0`` skips quantization-aware distillation, ``formats=()`` skips export."""

    sparsity: float = 0.8
    per_layer: bool = False
    structured_width: float = 0.5  # neurons / channels kept per layer by structured pruning; 0: none
    structured_multiple: int = 8  # kept units rounded up to a multiple of this (the kernels' vector width)
    prune_epochs: int = 20
    qat_epochs: int = 3
    quantize: bool = True
    calibration_images: int = 1024
    formats: tuple[str, ...] = E.FORMATS
    objective: object = objectives.SoftKD(temperature=4.0, kd_weight=0.9, ce_weight=0.1)
    optimizer: AdamWConfig = AdamWConfig(learning_rate=2e-3, weight_decay=0.0, warmup_epochs=0.0)
    batch_size: int = 128
    crop_padding: int = 0
    seed: int = 0
    dataset: str | None = None  # default: the dataset the student was trained on
    data_dir: str | None = None

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1) (the fraction of weights set to zero); got {self.sparsity}.")
        if self.structured_width != 0:  # 0: no structured pruning
            structured.check_width(self.structured_width)
            if self.structured_multiple < 1:
                raise ValueError(f"structured_multiple must be >= 1; got {self.structured_multiple}.")
        if self.quantize and self.calibration_images < MIN_CALIBRATION_IMAGES:
            raise ValueError(
                f"calibration_images must be >= {MIN_CALIBRATION_IMAGES} for static int8 scales; "
                f"got {self.calibration_images}."
            )
        for name in ("prune_epochs", "batch_size", "calibration_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if self.qat_epochs < 0:
            raise ValueError(f"qat_epochs must be >= 0; got {self.qat_epochs}.")
        if self.formats:
            E.check_formats(self.formats)


MIN_CALIBRATION_IMAGES = 32


def calibration_images(train, n: int, seed: int = 0) -> np.ndarray:
    """``min(n, len(train))`` raw uint8 training images for static int8 scales, chosen by ``seed``
    (the same ones for jkd's int8 student and the int8 ONNX)."""
    n = min(n, len(train))
    return train.read(np.sort(np.random.default_rng(seed).choice(len(train), n, replace=False)))[0]


LATENCY_BATCHES = (1, 128)  # an edge request, and a batch


def _npz_bytes(variables) -> int:
    """Size of the weights and BatchNorm statistics as a zip-deflated ``.npz`` (zeros and int8
    compress; floats barely). RNG counters are not counted: they are not deployed."""
    tree = (variables.params, variables.batch_stats)
    flat = {
        f"{i}:{pruning.layer_name(path)}": np.asarray(v)
        for i, (path, v) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0])
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **flat)
    return buf.getbuffer().nbytes


class _Job:
    def __init__(self, cfg: CompressConfig, out: Path, student_dir, teacher_dir, progress, echo, folder: RunFolder):
        self.cfg, self.out, self.progress, self.echo, self.folder = cfg, out, progress, echo, folder
        self.student_dir = Path(student_dir).absolute()
        self.sg, self.student, self.meta = load_saved_model(student_dir)
        if self.meta["role"] == "teacher":
            raise ValueError(
                f"{student_dir} holds a teacher; jkd compress works on a student (e.g. runs/demo/soft_kd_t_8/seed0)."
            )
        if self.meta.get("quantization") or self.meta.get("sparsity") or self.meta.get("structured_width"):
            raise ValueError(f"{student_dir} holds an already compressed student; give the uncompressed one.")
        self.tg, self.teacher, tmeta = load_saved_model(teacher_dir)
        if tmeta["role"] != "teacher":
            raise ValueError(f"{teacher_dir} holds a {tmeta['role']} model, not a teacher.")
        ds = load_dataset(cfg.dataset or self.meta["dataset"], data_dir=cfg.data_dir)
        check_dataset(self.meta, ds.spec, where=f"the student in {student_dir}")
        check_dataset(tmeta, ds.spec, where=f"the teacher in {teacher_dir}")
        self.spec = ds.spec
        self.train = P.reader(ds.split("train"), ds.spec.image_shape)
        self.test = P.reader(ds.split("test"), ds.spec.image_shape)
        self.mean, self.std = tuple(self.meta["mean"]), tuple(self.meta["std"])
        self.eval_view = functools.partial(augment.normalize, mean=self.mean, std=self.std)
        self.steps_per_epoch = len(self.train) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(self.train)} training images.")
        self.labels = P.labels_of(self.test)
        self.latency_inputs = {b: np.zeros((b, *self.spec.image_shape), np.uint8) for b in LATENCY_BATCHES}
        # A family that cannot be pruned structurally is refused here, before anything is written.
        self.plan = structured.plan_for(self.meta["model"], self.student) if cfg.structured_width else None
        # uint8: the exported artifacts' own input (normalised for jkd's own int8 by calibration())
        self.calibration_raw = (
            calibration_images(self.train, cfg.calibration_images, cfg.seed) if cfg.quantize else None
        )

    # ---- measuring ------------------------------------------------------------------------
    def predict(self, fn: Callable) -> np.ndarray:
        """Test-split logits of ``fn: uint8 [B, H, W, C] -> logits``."""
        return predict(lambda b: fn(b["image"]), self.test, batch_size=self.cfg.batch_size)[0]

    def row(self, name: str, kind: str, fn: Callable, size_bytes: int, *, runtime: str = "jax", **extra) -> dict:
        logits = self.predict(fn)
        ms = {b: latency.median_ms(fn, x) for b, x in self.latency_inputs.items()}
        return {
            "name": name,
            "kind": kind,
            "test_accuracy": float(np.mean(np.argmax(logits, -1) == self.labels)),
            "size_bytes": int(size_bytes),
            "runtime": runtime,
            **{f"latency_ms_batch{b}": v for b, v in ms.items()},
            "latency_ms": ms[max(ms)],
            **extra,
            "_logits": logits,
        }

    def model_row(
        self,
        name: str,
        kind: str,
        graphdef,
        variables,
        *,
        model: str | None = None,
        options: dict | None = None,
        **extra,
    ) -> dict:
        serve = jax.jit(E.serving_function(graphdef, variables, mean=self.mean, std=self.std))
        params = sum(x.size for x in jax.tree.leaves(variables.params))
        if model is not None:  # multiply-adds of the architecture (int8 and magnitude pruning keep them)
            built = create_model(model, num_classes=self.spec.num_classes, input_shape=self.spec.image_shape, **options)
            extra["flops"] = model_stats(built, self.spec.image_shape).flops
        return self.row(name, kind, serve, _npz_bytes(variables), params=int(params), **extra)

    def onnx_row(self, name: str, kind: str, path: Path, **extra) -> dict:
        return self.row(
            name,
            kind,
            functools.partial(_run_onnx, E.onnx_session(path)),
            path.stat().st_size,
            runtime="onnxruntime",
            **extra,
        )

    # ---- training (pruning and QAT share it) ----------------------------------------------------
    def distil(self, stage: str, graphdef, variables, epochs: int, extra_tx=None):
        """Fine-tune ``variables`` for ``epochs`` against the teacher; resumable from ``stage/ckpt``."""
        cfg = self.cfg
        total = epochs * self.steps_per_epoch
        tx = make_optimizer(cfg.optimizer, steps_per_epoch=self.steps_per_epoch, total_steps=total)
        if extra_tx is not None:
            tx = optax.chain(tx, extra_tx(total))
        params = jax.tree.map(jnp.copy, variables.params)  # the step donates its state
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=jax.tree.map(jnp.copy, variables.batch_stats),
            rest=jax.tree.map(jnp.copy, variables.rest),
            opt_state=tx.init(params),
            rng=jax.random.key(cfg.seed),
        )
        view = functools.partial(
            augment.augment, mean=self.mean, std=self.std, crop_padding=cfg.crop_padding, flip=self.spec.flip
        )
        step = functools.partial(train_step, graphdef=graphdef, tx=tx, view_fn=view, teacher_graphdef=self.tg)
        return train_group(
            self.folder,
            stage,
            parallel.single_device(step),
            state,
            cfg.objective,
            self.teacher,
            batches=lambda start: P.train_batches(
                self.train, batch_size=cfg.batch_size, seed=cfg.seed, start_step=start
            ),
            config=LoopConfig(num_steps=total, save_every=self.steps_per_epoch, progress=self.progress, label=stage),
            echo=self.echo,
        )

    def calibration(self) -> jax.Array:
        """The calibration images as the model sees them (normalised)."""
        return self.eval_view(jnp.asarray(self.calibration_raw))

    def saved(self, stage: str, build: Callable, meta_extra: dict):
        """Load ``stage/model`` if a previous run saved it, else build and save it."""
        path = self.out / stage / "model"
        if path.exists():
            self.echo(f"{stage}: loaded from {path}")
            g, v, _ = load_saved_model(path)
            return g, v
        g, v = build()
        save_frozen(path, v, {**self.meta, **meta_extra, "compressed_from": str(self.student_dir)})
        return g, v


def run_compress(
    student_dir: str | Path,
    out_dir: str | Path,
    *,
    teacher_dir: str | Path | None = None,
    config: CompressConfig = CompressConfig(),
    progress: bool = True,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> dict:
    """Compress the student saved in ``student_dir``; returns the summary (also written).

    The out folder follows the run folder's rule (:mod:`jkd.runtime.run_folder`) and always resumes: the
    same settings, student and teacher (their files' fingerprints included) continue where a run
    stopped; others are refused unless ``force`` (which deletes the old results first)."""
    cfg = config
    cfg.validate()
    student_dir, out = Path(student_dir), Path(out_dir)
    if teacher_dir is None:  # a run folder's layout: <run>/<setting>/seed<k> beside <run>/teacher/model
        teacher_dir = student_dir.parent.parent / SAVED_TEACHER
        if not teacher_dir.exists():
            raise FileNotFoundError(f"no teacher found at {teacher_dir}; pass the teacher's folder (--teacher-dir).")
    settings = {
        "student_dir": str(student_dir.absolute()),
        "teacher_dir": str(Path(teacher_dir).absolute()),
        **guarded_config(cfg, {"student_dir": student_dir, "teacher_dir": teacher_dir}),
    }
    # The run folder's rule; a compression run always continues where it stopped.
    folder = RunFolder(out, settings, resume=True, force=force, echo=echo)
    try:
        return _compress(folder, cfg, student_dir, teacher_dir, progress, echo)
    finally:
        folder.close()


def _compress(folder: RunFolder, cfg: CompressConfig, student_dir: Path, teacher_dir, progress, echo) -> dict:
    out = folder.path
    job = _Job(cfg, out, student_dir, teacher_dir, progress, echo, folder)
    folder.begin()

    student_options = dict(job.meta["options"])
    rows = [
        job.model_row("teacher", "teacher", job.tg, job.teacher),
        job.model_row(
            "student", "student (float32)", job.sg, job.student, model=job.meta["model"], options=student_options
        ),
    ]
    student_model = nnx.merge(job.sg, job.student.params, job.student.batch_stats, job.student.rest)
    prune_report = None
    int8_model = None

    if cfg.sparsity > 0:
        echo(
            f"pruning to {cfg.sparsity:.0%} sparsity ({'per layer' if cfg.per_layer else 'global'}) over "
            f"{cfg.prune_epochs} epochs of distillation"
        )

        def prune_tx(total):
            schedule = pruning.polynomial_sparsity(cfg.sparsity, begin_step=0, end_step=max(1, int(0.7 * total)))
            return pruning.magnitude_pruning(
                schedule, update_every=max(1, job.steps_per_epoch // 4), per_layer=cfg.per_layer
            )

        def build_pruned():
            state = job.distil("pruned", job.sg, job.student, cfg.prune_epochs, prune_tx)
            return job.sg, freeze(state)

        pg, pv = job.saved("pruned", build_pruned, {"sparsity": cfg.sparsity})
        prune_report = pruning.sparsity_report(pv.params)
        rows.append(
            job.model_row(
                f"pruned {cfg.sparsity:.0%}", "student, pruned", pg, pv, sparsity=prune_report["prunable_sparsity"]
            )
        )

    small = None
    if cfg.structured_width:
        small = _structured_row(job, rows, student_options)

    if cfg.quantize:
        with Q.qwix_promotion():  # qwix's int8 ops (see quantization.qwix_promotion)
            int8_rows, int8_model = _int8_rows(job, student_model, (pg, pv) if cfg.sparsity > 0 else None)
        rows += int8_rows

    checks = {}
    if cfg.formats:
        echo(f"exporting the student: {', '.join(cfg.formats)}")
        paths = E.export_model(job.sg, job.student, job.meta, out / "export", cfg.formats)
        reference = rows[1]["_logits"]
        runners = {
            "stablehlo": lambda p: jax.jit(E.load_stablehlo(p)),
            "onnx": lambda p: functools.partial(_run_onnx, E.onnx_session(p)),
        }
        for fmt, path in paths.items():
            r = job.row(
                f"exported ({fmt})",
                "student, exported",
                runners[fmt](path),
                path.stat().st_size,
                runtime={"stablehlo": "jax (StableHLO)", "onnx": "onnxruntime"}[fmt],
            )
            checks[fmt] = {
                "max_abs_diff": float(np.max(np.abs(r["_logits"] - reference))),
                "top1_agreement": float(np.mean(np.argmax(r["_logits"], -1) == np.argmax(reference, -1))),
                "path": str(path),
            }
            r.update(checks[fmt])
            rows.append(r)
        if int8_model is not None and "stablehlo" in cfg.formats:  # qwix's int8 goes out as StableHLO
            with Q.qwix_promotion():
                path = E.export_model(*int8_model, out / "export_int8", ("stablehlo",))["stablehlo"]
                rows.append(
                    job.row(
                        "exported int8 weights (stablehlo)",
                        "student, int8, exported",
                        jax.jit(E.load_stablehlo(path)),
                        path.stat().st_size,
                        runtime="jax (StableHLO)",
                    )
                )
        if cfg.quantize and "onnx" in paths:  # int8 for onnxruntime: QDQ with jkd's calibration images
            echo("int8 ONNX (QDQ): onnxruntime's static quantization on the calibration images")
            path = E.quantize_onnx_int8(paths["onnx"], job.calibration_raw, out / "export_int8" / E.ONNX_FILE)
            r = job.onnx_row("exported int8 (onnx, QDQ)", "student, int8, exported", path)
            static = next((x for x in rows if x["name"] == f"PTQ {Q.INT8_STATIC.name}"), None)
            if static is not None:  # against jkd's own static int8 student on the test split
                checks["onnx_int8"] = {
                    "top1_agreement_with_jkd_int8": float(
                        np.mean(np.argmax(r["_logits"], -1) == np.argmax(static["_logits"], -1))
                    ),
                    "accuracy_difference_vs_jkd_int8": r["test_accuracy"] - static["test_accuracy"],
                    "path": str(path),
                }
                r.update(checks["onnx_int8"])
            rows.append(r)
        if small is not None and "onnx" in cfg.formats:
            sg, sv, smeta = small
            export_dir = out / "export_structured"
            path = E.export_model(sg, sv, smeta, export_dir, ("onnx",))["onnx"]
            rows.append(
                job.onnx_row(f"structured {cfg.structured_width:.0%} (onnx)", "student, structured, exported", path)
            )
            if cfg.quantize:
                qpath = E.quantize_onnx_int8(path, job.calibration_raw, export_dir / "model_int8.onnx")
                rows.append(
                    job.onnx_row(
                        f"structured {cfg.structured_width:.0%} + int8 (onnx, QDQ)",
                        "student, structured + int8, exported",
                        qpath,
                    )
                )
    return _write_report(out, rows, cfg, prune_report, checks, echo)


def _unit_state(opt_state) -> structured.UnitPruningState:
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, structured.UnitPruningState))
        if isinstance(x, structured.UnitPruningState)
    ]
    return found[0]


def _structured_row(job: _Job, rows: list, student_options: dict):
    """Neurons / channels pruned while the teacher keeps teaching, then cut out: a smaller dense
    student of the same family, saved like any student. Returns ``(graphdef, variables, meta)``."""
    cfg, plan = job.cfg, job.plan
    before = structured.group_sizes(job.student.params, plan)
    job.echo(
        f"structured pruning: keeping {cfg.structured_width:.0%} of the units of "
        f"{', '.join(g.name for g in plan.groups)} "
        f"{before} (rounded up to multiples of {cfg.structured_multiple}) over {cfg.prune_epochs} "
        "epochs of distillation"
    )

    def unit_tx(total):
        schedule = pruning.polynomial_sparsity(
            1.0 - cfg.structured_width, begin_step=0, end_step=max(1, int(0.7 * total))
        )
        return structured.unit_pruning(
            plan, schedule, update_every=max(1, job.steps_per_epoch // 4), multiple=cfg.structured_multiple
        )

    path = job.out / "structured" / "model"
    if path.exists():
        job.echo(f"structured: loaded from {path}")
    else:
        state = job.distil("structured", job.sg, job.student, cfg.prune_epochs, unit_tx)
        masks = _unit_state(state.opt_state).masks
        new_options, small = structured.shrink(freeze(state), plan, masks)
        options = {**student_options, **new_options}
        save_frozen(
            path,
            small,
            {
                **job.meta,
                "options": [[k, list(v) if isinstance(v, tuple) else v] for k, v in options.items()],
                "structured_width": cfg.structured_width,
                "compressed_from": str(job.student_dir),
            },
        )
    sg, sv, meta = load_saved_model(path)  # the smaller model, loaded as any saved student
    after = structured.group_sizes(sv.params, plan)
    row = job.model_row(
        f"structured {cfg.structured_width:.0%}",
        "student, structured",
        sg,
        sv,
        model=meta["model"],
        options=dict(meta["options"]),
        units={g.name: {"before": b, "after": a} for g, b, a in zip(plan.groups, before, after)},
    )
    rows.append(row)
    return sg, sv, meta


def _int8_rows(job: _Job, student_model, pruned):
    """PTQ (two schemes), QAT and pruned + int8 rows; returns ``(rows, (graphdef, variables,
    meta) of the int8-weights student, for export)``."""
    cfg, rows = job.cfg, []
    calib = job.calibration()
    exported = None
    for stage, scheme in (("int8_weights", Q.INT8_WEIGHTS), ("int8_static", Q.INT8_STATIC)):
        job.echo(f"{scheme.name}: post-training quantization ({len(calib)} calibration images)")
        qg, qv = job.saved(
            stage, lambda s=scheme: freeze_model(Q.quantize(student_model, calib, s)), {"quantization": scheme.name}
        )
        rows.append(
            job.model_row(f"PTQ {scheme.name}", "student, int8", qg, qv, int8_fraction=Q.int8_fraction(qv.params))
        )
        exported = exported or (qg, qv, {**job.meta, "quantization": scheme.name})
    if cfg.qat_epochs > 0:
        job.echo(f"quantization-aware distillation: {cfg.qat_epochs} epochs, then {Q.INT8_WEIGHTS.name}")

        def build_qat():
            qat = Q.qat_model(student_model, calib[:2], Q.INT8_WEIGHTS)
            qatg = split_model(qat)[0]
            state = job.distil("int8_qat", qatg, job.student, cfg.qat_epochs)
            trained = nnx.merge(qatg, state.params, state.batch_stats, state.rest)
            return freeze_model(Q.quantize(trained, calib, Q.INT8_WEIGHTS))

        qg, qv = job.saved("int8_qat", build_qat, {"quantization": Q.INT8_WEIGHTS.name, "qat": True})
        rows.append(
            job.model_row(
                f"QAT {Q.INT8_WEIGHTS.name}", "student, int8", qg, qv, int8_fraction=Q.int8_fraction(qv.params)
            )
        )
    if pruned is not None:
        pg, pv = pruned
        qg, qv = freeze_model(Q.quantize(nnx.merge(pg, pv.params, pv.batch_stats, pv.rest), calib, Q.INT8_WEIGHTS))
        rows.append(
            job.model_row(
                f"pruned {cfg.sparsity:.0%} + {Q.INT8_WEIGHTS.name}",
                "student, pruned + int8",
                qg,
                qv,
                sparsity=pruning.sparsity_report(qv.params)["prunable_sparsity"],
            )
        )
    return rows, exported


def _run_onnx(session, images):
    return session.run(None, {"images": np.asarray(images)})[0]


def _write_report(out: Path, rows, cfg, prune_report, checks, echo) -> dict:
    from jkd.evaluate import report

    student = rows[1]["test_accuracy"]
    for r in rows:
        r.pop("_logits")
        r["delta_vs_student"] = r["test_accuracy"] - student
    notes = [
        f"accuracy on the test split; size is the zip-deflated weights (.npz) for models and the file for "
        f"exported artifacts; latency is the median of up to 20 calls (2 s per row at most) on raw uint8 "
        f"images (normalisation included), at batch 1 and 128, in the runtime each row ships with: jax (XLA on "
        f"{jax.devices()[0].platform}, what the StableHLO artifact runs in) or onnxruntime (CPU)."
    ]
    by_name = {r["name"]: r for r in rows}

    def speedup(fast: dict, slow: dict, batch: int) -> float:
        return slow[f"latency_ms_batch{batch}"] / fast[f"latency_ms_batch{batch}"]

    for r in rows:
        if r["kind"] == "student, pruned":
            notes.append(
                f"{r['name']}: {100 * r['delta_vs_student']:+.2f} points vs the student (target: lose < 1); "
                f"real sparsity of the pruned weights {r['sparsity']:.3f}. Dense kernels: XLA does not "
                "skip zeros, so latency does not drop; the size does."
            )
        if r["kind"] == "student, structured":
            ideal = rows[1]["flops"] / max(r["flops"], 1)
            measured = speedup(r, rows[1], 128)
            units = ", ".join(f"{g} {u['before']} -> {u['after']}" for g, u in r["units"].items())
            notes.append(
                f"{r['name']}: {100 * r['delta_vs_student']:+.2f} points vs the student (target: lose < 1); "
                f"units {units}; FLOPs / {ideal:.2f} (the ideal speed-up), measured {measured:.2f}x at batch "
                f"128 ({100 * measured / ideal:.0f}% of the ideal) and {speedup(r, rows[1], 1):.2f}x at batch 1 "
                "in jax."
            )
        if r["kind"].startswith("student, int8"):
            notes.append(f"{r['name']}: {100 * r['delta_vs_student']:+.2f} points vs the student (target: lose < 0.5).")
    onnx_float, onnx_int8 = by_name.get("exported (onnx)"), by_name.get("exported int8 (onnx, QDQ)")
    if onnx_float is not None and onnx_int8 is not None:
        isa = ", ".join(E.cpu_integer_instructions()) or "none reported"
        notes.append(
            f"int8 ONNX (QDQ) in onnxruntime: {speedup(onnx_int8, onnx_float, 128):.2f}x the float ONNX at "
            f"batch 128, {speedup(onnx_int8, onnx_float, 1):.2f}x at batch 1 (target >= 1.5x at batch 128), "
            f"{100 * onnx_int8['delta_vs_student']:+.2f} points vs the student; this CPU's integer "
            f"instructions: {isa}."
        )
        if "top1_agreement_with_jkd_int8" in onnx_int8:
            notes.append(
                f"int8 ONNX vs jkd's static int8 student: the same top-1 on "
                f"{100 * onnx_int8['top1_agreement_with_jkd_int8']:.2f}% of test images (target >= 99%), "
                f"accuracy {100 * onnx_int8['accuracy_difference_vs_jkd_int8']:+.2f} points (target within 0.3)."
            )
    onnx_rows = [r for r in rows if r.get("runtime") == "onnxruntime"]
    if onnx_rows:
        fastest = min(onnx_rows, key=lambda r: r["latency_ms_batch128"])
        notes.append(
            f"fastest deployed row at batch 128: {fastest['name']} ({fastest['latency_ms_batch128']:.2f} ms, "
            f"{fastest['size_bytes'] / 1024:.0f} KB, {100 * fastest['test_accuracy']:.2f}%)."
        )
    if prune_report is not None:
        notes.append(
            "sparsity per pruned layer: "
            + ", ".join(
                f"{name} {v['sparsity']:.3f} ({v['zeros']:,}/{v['size']:,})"
                for name, v in prune_report["layers"].items()
            )
        )
    for fmt, c in ((f, c) for f, c in checks.items() if "max_abs_diff" in c):
        notes.append(
            f"exported {fmt}: max |logit difference| {c['max_abs_diff']:.2e} vs JAX, same top-1 on "
            f"{100 * c['top1_agreement']:.2f}% of test images."
        )
    md = report.write(
        out,
        rows,
        report.Report(
            "Compression of the student",
            report.compression_table(rows),
            notes,
            extra={"pruning": prune_report, "export_checks": checks},
        ),
        roles=None,
        names=("compress_summary.json", "compress_report.md"),
    )
    echo("\n" + md + "\n")
    for n in notes:
        echo(n)
    return json.loads((out / "compress_summary.json").read_text())
