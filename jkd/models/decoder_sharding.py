"""Where a decoder's parameters live on a ``('data', 'model')`` device mesh.

Every matrix is split over both axes: its "wide" side (heads, MLP features, vocabulary) over
``'model'`` (tensor parallelism, Megatron's split: q/k/v/gate/up by output, o/down by input) and
its hidden-size side over ``'data'`` (fully sharded data parallelism), so each of ``N`` devices
holds ``1/N`` of every matrix whose sides divide. A side that does not divide its axis is kept
whole on that axis (never an error). Norm weights are replicated. Batches are split over
``'data'``; jit (GSPMD) inserts the gathers. The same rules serve one host and a multi-host slice
after ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# HF-style parameter name suffix -> mesh axis of each dimension.
_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    ("embed_tokens.weight", (MODEL, DATA)),
    ("lm_head.weight", (MODEL, DATA)),
    ("q_proj.weight", (MODEL, DATA)),
    ("k_proj.weight", (MODEL, DATA)),
    ("v_proj.weight", (MODEL, DATA)),
    ("gate_proj.weight", (MODEL, DATA)),
    ("up_proj.weight", (MODEL, DATA)),
    ("o_proj.weight", (DATA, MODEL)),
    ("down_proj.weight", (DATA, MODEL)),
    ("q_proj.bias", (MODEL,)),
    ("k_proj.bias", (MODEL,)),
    ("v_proj.bias", (MODEL,)),
    ("gate_proj.bias", (MODEL,)),
    ("up_proj.bias", (MODEL,)),
)


def make_mesh(data: int | None = None, model: int = 1, *, devices=None) -> Mesh:
    """A ``('data', 'model')`` mesh over ``devices`` (default: all); ``data`` defaults to what is
    left after ``model``."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"make_mesh: model={model} must divide the {len(devices)} devices")
    data = len(devices) // model if data is None else data
    if data * model != len(devices):
        raise ValueError(f"make_mesh: data={data} x model={model} != {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The ``PartitionSpec`` of the parameter called ``name`` (HF naming) on ``mesh``."""
    for suffix, axes in _RULES:
        if name.endswith(suffix) and len(axes) == len(shape):
            spec = [a if a in mesh.shape and size % mesh.shape[a] == 0 else None for a, size in zip(axes, shape)]
            return P(*spec)
    return P()


def hf_name(path: tuple) -> str:
    """The Hugging Face tensor name of a decoder parameter's nnx path."""
    name = ".".join(str(p) for p in path)
    return name if name.startswith("lm_head") else "model." + name


def parameter_sharding(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """The ``NamedSharding`` of the decoder parameter at nnx ``path``."""
    return NamedSharding(mesh, partition_spec(hf_name(path), shape, mesh))


def decoder_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A decoder's (abstract) state with each variable's value replaced by its ``NamedSharding``
    (the form ``jax.jit``'s ``out_shardings`` and orbax's restore take)."""
    return nnx.from_flat_state(
        [(path, v.replace(parameter_sharding(path, tuple(v.shape), mesh))) for path, v in nnx.to_flat_state(state)]
    )


def shard_decoder(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place ``model``'s parameters on ``mesh`` by the rules above (in place; returns it)."""
    flat = [
        (path, v.replace(jax.device_put(v[...], parameter_sharding(path, tuple(v.shape), mesh))))
        for path, v in nnx.to_flat_state(nnx.state(model))
    ]
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _key_name(key) -> str | None:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            name = str(getattr(key, attr))
            return None if name in ("value", "raw_value") else name
    return str(key)


def tree_shardings(tree, mesh: Mesh):
    """A ``NamedSharding`` for every array of ``tree`` (a train state, a frozen teacher, their
    stacks over seeds, an optimizer's moments): a leaf whose path ends in a decoder parameter's name
    (``...q_proj.weight``) is split by that parameter's rule over its trailing dimensions (leading
    ones, e.g. the seeds' axis, stay whole); everything else is replicated."""

    def one(path, x):
        if not hasattr(x, "shape"):
            return x
        name = ".".join(n for n in map(_key_name, path) if n is not None)
        for suffix, axes in _RULES:
            if name.endswith(suffix) and x.ndim >= len(axes):
                lead = x.ndim - len(axes)
                spec = partition_spec(suffix, tuple(x.shape[lead:]), mesh)
                return NamedSharding(mesh, P(*((None,) * lead + tuple(spec) + (None,) * (len(axes) - len(spec)))))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """``[B, ...]`` inputs split over ``'data'``."""
    return NamedSharding(mesh, P(DATA))
