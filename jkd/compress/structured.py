"""Structured pruning: whole neurons and channels removed, leaving a smaller *dense* model.

Magnitude pruning (:mod:`jkd.compress.pruning`) zeroes single weights; XLA's and onnxruntime's
dense kernels still multiply the zeros, so the model is smaller on disk and no faster. Here the
unit of pruning is a hidden layer's neuron or a convolution's output channel: a :class:`Plan`
says, for one model family, which parameters *produce* each group of units (the layer's kernel
column or filter, its bias, its BatchNorm scale, shift and statistics) and which *consume* them
(the next layer's kernel rows or input channels).

1. :func:`unit_pruning` is an optax transform (last in the chain, as ``magnitude_pruning``) that
   ranks the units of every group while the student keeps learning from its teacher and keeps
   the pruned ones at exactly zero: a pruned unit's output is 0 (a zero filter and bias, or a
   zero BatchNorm scale and shift), so removing it changes nothing.
2. :func:`shrink` then slices the kept units out of every producing and consuming array: the
   model of the same family with fewer units (``hidden=(...)`` for MLPs, ``channels=(...)`` for
   the ``cnn``), whose logits equal the masked model's.

A unit's score is the size of what it passes on: ``|BN scale|`` (network slimming, Liu et al.
2017) or the L2 norm of the producing weights when there is no BatchNorm, times the L2 norm of
the consuming weights. Every group keeps ``ceil(width * units)`` units (at least one), rounded
up to a multiple of ``multiple`` (at most all of them), so ``width`` is the fraction of neurons or
channels kept in every layer. The rounding is for the kernels: onnxruntime's convolutions ran the
cnn with (23, 45) channels no faster than with (32, 64), and twice as fast with (16, 32); the
compress job rounds to multiples of 8.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jkd.compress.pruning import Schedule, layer_name


@dataclasses.dataclass(frozen=True)
class Slice:
    """The axis ``axis`` of the array ``leaf`` (a layer name, e.g. ``layers/0/kernel``) in the
    model's ``collection`` (``params`` or ``batch_stats``)."""

    collection: str
    leaf: str
    axis: int


@dataclasses.dataclass(frozen=True)
class Group:
    """One layer's units: the slices that compute them and the slices that read them."""

    name: str
    produce: tuple[Slice, ...]
    consume: tuple[Slice, ...]
    scale: Slice | None = None  # a BatchNorm scale after the layer: it ranks the units


@dataclasses.dataclass(frozen=True)
class Plan:
    """A family's prunable groups and how to name the smaller model: ``options(kept)`` are the
    size options of the model with ``kept[i]`` units in group ``i``."""

    groups: tuple[Group, ...]
    options: Callable[[tuple[int, ...]], dict]


def _mlp_plan(num_hidden: int) -> Plan:
    groups = []
    for i in range(num_hidden):
        nxt = f"layers/{i + 1}/kernel" if i + 1 < num_hidden else "head/kernel"
        groups.append(
            Group(
                f"hidden{i + 1}",
                produce=(Slice("params", f"layers/{i}/kernel", 1), Slice("params", f"layers/{i}/bias", 0)),
                consume=(Slice("params", nxt, 0),),
            )
        )
    return Plan(tuple(groups), lambda kept: {"hidden": tuple(int(k) for k in kept)})


def _cnn_plan() -> Plan:
    def bn(i):
        return (
            Slice("params", f"bn{i}/scale", 0),
            Slice("params", f"bn{i}/bias", 0),
            Slice("batch_stats", f"bn{i}/mean", 0),
            Slice("batch_stats", f"bn{i}/var", 0),
        )

    return Plan(
        (
            Group(
                "conv1",
                produce=(Slice("params", "conv1/kernel", 3), *bn(1)),
                consume=(Slice("params", "conv2/kernel", 2),),
                scale=Slice("params", "bn1/scale", 0),
            ),
            Group(
                "conv2",
                produce=(Slice("params", "conv2/kernel", 3), *bn(2)),
                consume=(Slice("params", "head/kernel", 0),),
                scale=Slice("params", "bn2/scale", 0),
            ),
        ),
        lambda kept: {"channels": tuple(int(k) for k in kept)},
    )


PRUNABLE_FAMILIES = "the MLPs (mlp, mlp_100, mlp_2x800, ...) and the small CNN (cnn)"


def plan_for(model: str, variables) -> Plan:
    """The plan of a saved model's family (``model`` is its zoo name); a family that cannot be
    pruned structurally yet is refused, naming those that can."""
    names = {layer_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables.params)[0]}
    if model.startswith("mlp"):
        plan = _mlp_plan(sum(1 for n in names if n.startswith("layers/") and n.endswith("/kernel")))
    elif model == "cnn":
        plan = _cnn_plan()
    else:
        raise ValueError(
            f"model {model!r} cannot be pruned structurally (yet); the families that can: "
            f"{PRUNABLE_FAMILIES}. Use magnitude pruning (--sparsity) for it."
        )
    missing = sorted(
        {s.leaf for g in plan.groups for s in (*g.produce, *g.consume) if s.collection == "params"} - names
    )
    if missing or not plan.groups:
        raise ValueError(
            f"model {model!r} does not have the layers its family's plan expects "
            f"(missing: {', '.join(missing) or 'every hidden layer'})."
        )
    return plan


def check_width(width: float) -> None:
    if not 0.0 < width < 1.0:
        raise ValueError(
            f"the structured width must lie in (0, 1) (the fraction of neurons and channels kept "
            f"in every layer, e.g. 0.5); got {width}."
        )


# ---- the arrays of a group -----------------------------------------------------------------


def _named(params) -> dict[str, jax.Array]:
    """The ``params`` leaves by layer name (``layers/0/kernel``), flattened once per call."""
    return {layer_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _norms(named: dict, slices) -> jax.Array:
    """Per unit, the L2 norm of all its weights in the ``params`` slices."""
    return jnp.sqrt(
        sum(
            jnp.sum(
                jnp.square(
                    jnp.moveaxis(named[s.leaf], s.axis, 0).reshape(named[s.leaf].shape[s.axis], -1).astype(jnp.float32)
                ),
                axis=1,
            )
            for s in slices
            if s.collection == "params"
        )
    )


def group_sizes(params, plan: Plan) -> tuple[int, ...]:
    named = _named(params)
    return tuple(int(named[g.produce[0].leaf].shape[g.produce[0].axis]) for g in plan.groups)


def unit_scores(params, plan: Plan) -> tuple[jax.Array, ...]:
    """One score per unit of each group (``[units]`` float32): what the unit passes on."""
    named = _named(params)
    return tuple(
        (jnp.abs(named[g.scale.leaf].astype(jnp.float32)) if g.scale is not None else _norms(named, g.produce))
        * _norms(named, g.consume)
        for g in plan.groups
    )


def kept_count(units: int, width, multiple: int = 1) -> jax.Array:
    """``ceil(width * units)``, at least one, rounded up to a multiple of ``multiple`` and at
    most ``units`` (``width`` may be traced)."""
    k = jnp.maximum(jnp.ceil(jnp.asarray(width, jnp.float32) * units - 1e-6).astype(jnp.int32), 1)
    return jnp.minimum(-(-k // multiple) * multiple, units)


def unit_masks(
    params, plan: Plan, width, previous: tuple[jax.Array, ...] | None = None, multiple: int = 1
) -> tuple[jax.Array, ...]:
    """Bool ``[units]`` per group (True: kept): the ``kept_count(units, width, multiple)`` best scores.
    Units pruned in ``previous`` rank below every other, so with a non-increasing width they stay
    pruned."""
    masks = []
    for i, score in enumerate(unit_scores(params, plan)):
        if previous is not None:
            score = jnp.where(previous[i], score, -1.0)
        n = score.shape[0]
        order = jnp.argsort(-score, stable=True)  # best first; ties by position
        masks.append(jnp.zeros((n,), bool).at[order].set(jnp.arange(n) < kept_count(n, width, multiple)))
    return tuple(masks)


def _leaf_masks(params, plan: Plan, masks) -> dict[str, jax.Array]:
    """Per producing ``params`` leaf (by name): a bool mask broadcast along its units' axis."""
    named, out = _named(params), {}
    for g, m in zip(plan.groups, masks):
        for s in g.produce:
            if s.collection != "params":
                continue
            x = named[s.leaf]
            shape = [1] * x.ndim
            shape[s.axis] = x.shape[s.axis]
            out[s.leaf] = jnp.reshape(m, shape)
    return out


def apply_unit_masks(params, plan: Plan, masks):
    """``params`` with every pruned unit's producing weights at exactly zero."""
    leaf_masks = _leaf_masks(params, plan, masks)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jnp.where(leaf_masks[layer_name(p)], x, jnp.zeros((), x.dtype)) if layer_name(p) in leaf_masks else x
        ),
        params,
    )


class UnitPruningState(NamedTuple):
    count: jax.Array  # int32: updates seen
    masks: tuple[jax.Array, ...]  # bool [units] per group


def unit_pruning(
    plan: Plan, schedule: Schedule, *, update_every: int = 1, multiple: int = 1
) -> optax.GradientTransformation:
    """An optax transform (last in the chain) that prunes units to ``1 - schedule(step)`` of each
    group and keeps them at zero: every ``update_every`` updates the masks are recomputed from
    the would-be new parameters; each update makes the new parameters ``mask * (params + update)``."""
    if update_every < 1 or multiple < 1:
        raise ValueError(f"update_every and multiple must be >= 1; got {update_every}, {multiple}.")

    def init(params):
        return UnitPruningState(
            jnp.zeros((), jnp.int32), tuple(jnp.ones((n,), bool) for n in group_sizes(params, plan))
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("unit_pruning needs params in update().")
        new = jax.tree.map(lambda p, u: p + u, params, updates)
        recompute = state.count % update_every == 0
        fresh = unit_masks(new, plan, 1.0 - schedule(state.count), previous=state.masks, multiple=multiple)
        masks = tuple(jnp.where(recompute, f, m) for f, m in zip(fresh, state.masks))
        pruned = apply_unit_masks(new, plan, masks)
        return jax.tree.map(lambda q, p: q - p, pruned, params), UnitPruningState(state.count + 1, masks)

    return optax.GradientTransformation(init, update)


def shrink(variables, plan: Plan, masks) -> tuple[dict, object]:
    """``(options, variables)`` of the smaller dense model: the kept units sliced out of every
    producing and consuming array (``variables`` is a ``FrozenModel``; ``rest`` is kept)."""
    kept = [np.flatnonzero(np.asarray(m)) for m in masks]
    cuts: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    for g, idx in zip(plan.groups, kept):
        for s in (*g.produce, *g.consume):
            cuts.setdefault((s.collection, s.leaf), []).append((s.axis, idx))

    def cut(collection):
        def one(path, x):
            for axis, idx in cuts.get((collection, layer_name(path)), ()):
                x = jnp.take(x, jnp.asarray(idx), axis=axis)
            return x

        return lambda tree: jax.tree_util.tree_map_with_path(one, tree)

    out = dataclasses.replace(
        variables, params=cut("params")(variables.params), batch_stats=cut("batch_stats")(variables.batch_stats)
    )
    return plan.options(tuple(len(i) for i in kept)), out


def kept_sizes(masks) -> tuple[int, ...]:
    return tuple(int(np.sum(np.asarray(m))) for m in masks)
