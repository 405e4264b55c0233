"""Train state as a pytree, and pure functions that apply a split NNX model.

A model is split once into a static ``graphdef`` and three pytrees: ``params`` (trained),
``batch_stats`` (BatchNorm running statistics) and ``rest`` (RNG counters and anything else).
Steps merge them inside ``jit`` (no Python-side graph traversal per call).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx, struct

from jkd.models._layers import call_with_features


@struct.dataclass
class TrainState:
    """Everything a student (or a teacher in training) carries from step to step.

    ``step`` also is the data position: the number of batches consumed. ``aux`` holds what an
    objective trains or carries beside the model (CRD's heads and memory: ``{"params", "state"}``,
    :func:`jkd.train.steps.with_objective_aux`), None for most objectives; it is never exported.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    rest: Any
    opt_state: Any
    rng: jax.Array
    aux: Any = None


@struct.dataclass
class FrozenModel:
    """A trained model as data: its variables, never updated (the teacher)."""

    params: Any
    batch_stats: Any
    rest: Any


def split_model(model: nnx.Module):
    """``(graphdef, params, batch_stats, rest)`` of an NNX model."""
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def apply_model(graphdef, params, batch_stats, rest, x: jax.Array, *, train: bool, with_features: bool = False):
    """Run the model; returns ``(logits, features or None, new_batch_stats, new_rest)``.

    In train mode BatchNorm uses (and updates) batch statistics and dropout is active; in
    eval mode the running statistics are used and nothing changes.
    """
    # Fresh Variable objects in the current trace (e.g. inside ``grad``): states passed into
    # ``jit`` hold Variables of the outer trace, which BatchNorm may not mutate from here.
    params, batch_stats, rest = jax.tree.map(lambda x: x, (params, batch_stats, rest))
    model = nnx.merge(graphdef, params, batch_stats, rest)
    model.train() if train else model.eval()
    if with_features:
        logits, features = call_with_features(model, x)
    else:
        logits, features = model(x), None
    _, _, new_stats, new_rest = split_model(model)
    return logits, features, new_stats, new_rest


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, seed: int):
    """``(graphdef, TrainState)`` for ``model`` with optimizer ``tx``, at step 0."""
    graphdef, params, batch_stats, rest = split_model(model)
    return graphdef, TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        batch_stats=batch_stats,
        rest=rest,
        opt_state=tx.init(params),
        rng=jax.random.key(seed),
    )


def freeze(state: TrainState) -> FrozenModel:
    """The trained variables of a state, as frozen teacher data (no optimizer state)."""
    return FrozenModel(params=state.params, batch_stats=state.batch_stats, rest=state.rest)


def freeze_model(model: nnx.Module):
    """``(graphdef, FrozenModel)`` of an NNX model, e.g. a teacher restored or built by hand."""
    graphdef, params, batch_stats, rest = split_model(model)
    return graphdef, FrozenModel(params=params, batch_stats=batch_stats, rest=rest)
