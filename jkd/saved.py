"""Saved models: what is stored beside a model's variables, loading it back, and the one
compatibility check (model, options, role, classes, image shape) every command uses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from jkd.models import create_model
from jkd.train.checkpoint import abstract_like, load_frozen


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model of the zoo by name, with its size options (``hidden``, ``width``, ``dropout``)."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    def build(self, num_classes, input_shape, seed, bn_axis_name=None):
        return create_model(
            self.name,
            num_classes=num_classes,
            input_shape=input_shape,
            seed=seed,
            bn_axis_name=bn_axis_name,
            **dict(self.options),
        )


def model_meta(mspec: ModelSpec, spec, role: str) -> dict:
    """What is saved beside a model's variables so that it can be rebuilt and evaluated alone."""
    return {
        "model": mspec.name,
        "options": [list(o) for o in mspec.options],
        "role": role,
        "dataset": spec.name,
        "num_classes": spec.num_classes,
        "image_shape": list(spec.image_shape),
        "mean": list(spec.mean),
        "std": list(spec.std),
    }


def _dataset_problems(meta: dict, spec) -> list[str]:
    if meta["num_classes"] != spec.num_classes or tuple(meta["image_shape"]) != tuple(spec.image_shape):
        return [
            f"it was trained on {meta['dataset']} ({meta['num_classes']} classes, images "
            f"{tuple(meta['image_shape'])}) but {spec.name} has {spec.num_classes} classes and images "
            f"{tuple(spec.image_shape)}"
        ]
    return []


def check_dataset(meta: dict, spec, *, where: str) -> None:
    """Refuse a dataset whose classes or image shape are not the saved model's."""
    problems = _dataset_problems(meta, spec)
    if problems:
        raise ValueError(f"{where} cannot run on {spec.name}: {problems[0]}.")


def check_saved_model(meta: dict, mspec: ModelSpec, spec, *, where: str, role: str | None = None) -> None:
    """Refuse a saved model that is not the configured one: role, model name, size options,
    classes and image shape are compared; the error names what was saved and what is wanted."""
    saved_options = sorted((str(k), v) for k, v in meta["options"])
    wanted_options = sorted((str(k), list(v) if isinstance(v, tuple) else v) for k, v in mspec.options)
    problems = []
    if role is not None and meta.get("role") != role:
        problems.append(f"it holds a {meta.get('role')} model, not a {role}")
    if meta["model"] != mspec.name or saved_options != wanted_options:
        problems.append(
            f"it holds {meta['model']} {dict(saved_options) or ''} but the config names "
            f"{mspec.name} {dict(wanted_options) or ''}".replace("  ", " ")
        )
    problems += _dataset_problems(meta, spec)
    if problems:
        raise ValueError(f"{where} is not the configured model: {'; '.join(problems)}.")


def load_saved_model(path: str | Path):
    """``(graphdef, variables, meta)`` of a model saved by a run (teacher or a student seed)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "meta").exists():
        raise FileNotFoundError(
            f"{path} holds no saved jkd model (expected a folder written by a run, "
            "e.g. runs/demo/teacher/model or runs/demo/soft_kd_t_8/seed0)."
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        meta = ckpt.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    from jkd.train import freeze_model

    mspec = ModelSpec(meta["model"], tuple(tuple(o) for o in meta["options"]))
    model = mspec.build(meta["num_classes"], tuple(meta["image_shape"]), 0)
    if meta.get("quantization"):  # rebuild the int8 structure; the loaded values replace it
        from jkd.compress import quantization

        if meta["quantization"] not in quantization.SCHEMES:
            raise ValueError(
                f"{path} holds a model quantized with {meta['quantization']!r}, unknown to this "
                f"jkd (known: {', '.join(quantization.SCHEMES)})."
            )
        sample = jax.numpy.zeros((1, *meta["image_shape"]), jax.numpy.float32)
        model = quantization.quantize(model, sample, quantization.SCHEMES[meta["quantization"]])
    graphdef, template = freeze_model(model)
    variables, _ = load_frozen(path, abstract_like(template))
    return graphdef, variables, meta
