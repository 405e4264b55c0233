"""Magnitude pruning: masks, a sparsity schedule, and an optax transform that keeps pruned
weights at exactly zero while the student keeps learning (from its teacher).

The transform goes last in a chain, after the optimizer::

    tx = optax.chain(make_optimizer(...), magnitude_pruning(polynomial_sparsity(0.8, ...)))

Its state holds the masks, so a resumed run continues with the same ones. Pruned weights
count as magnitude 0 when masks are recomputed, so with a non-decreasing schedule a weight,
once pruned, stays pruned (Zhu & Gupta, 2017, "To prune, or not to prune").
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[jax.Array], jax.Array]  # optimizer step -> target sparsity in [0, 1)


def _check_sparsity(sparsity, name: str = "sparsity") -> None:
    if isinstance(sparsity, (int, float, np.floating, np.integer)) and not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must lie in [0, 1) (the fraction of weights set to zero); got {sparsity}.")


def default_prunable(path: tuple, leaf: jax.Array) -> bool:
    """Kernels (``ndim >= 2``: dense and conv weights) are pruned; biases and BatchNorm are not."""
    del path
    return leaf.ndim >= 2


def layer_name(path: tuple) -> str:
    """``conv1/kernel`` for the key path of a parameter leaf."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name != "value":
            parts.append(str(name))
    return "/".join(parts)


def prunable_tree(params, prunable=default_prunable):
    """A bool pytree like ``params``: which leaves may be pruned."""
    return jax.tree_util.tree_map_with_path(lambda p, x: bool(prunable(p, x)), params)


def _keep_smallest_out(magnitudes: jax.Array, sparsity: jax.Array) -> jax.Array:
    """Bool ``[n]``: False for the ``floor(sparsity * n)`` smallest of ``magnitudes [n]``
    (ties broken by position, so exactly that many are pruned)."""
    n = magnitudes.shape[0]
    k = jnp.floor(sparsity.astype(jnp.float32) * n).astype(jnp.int32)
    order = jnp.argsort(magnitudes, stable=True)
    return jnp.zeros((n,), bool).at[order].set(jnp.arange(n, dtype=jnp.int32) >= k)


def magnitude_masks(params, sparsity, *, per_layer: bool = False, prunable=default_prunable):
    """Bool masks like ``params`` (True: kept) pruning the smallest-magnitude weights.

    ``sparsity`` (scalar in [0, 1)) is the fraction of prunable weights set to zero: over all
    of them at once (global, the default: layers that matter keep more), or in each layer
    (``per_layer=True``). Leaves that ``prunable(path, leaf)`` rejects are all True.
    """
    _check_sparsity(sparsity)
    sparsity = jnp.asarray(sparsity, jnp.float32)
    which = prunable_tree(params, prunable)
    leaves, treedef = jax.tree.flatten(params)
    chosen = [i for i, w in enumerate(jax.tree.leaves(which)) if w]
    masks = [jnp.ones(x.shape, bool) for x in leaves]
    if not chosen:
        return jax.tree.unflatten(treedef, masks)
    if per_layer:
        for i in chosen:
            x = leaves[i]
            masks[i] = _keep_smallest_out(jnp.abs(x).reshape(-1), sparsity).reshape(x.shape)
    else:
        flat = jnp.concatenate([jnp.abs(leaves[i]).reshape(-1) for i in chosen])
        keep = _keep_smallest_out(flat, sparsity)
        start = 0
        for i in chosen:
            size = leaves[i].size
            masks[i] = keep[start : start + size].reshape(leaves[i].shape)
            start += size
    return jax.tree.unflatten(treedef, masks)


def apply_masks(params, masks):
    """``params`` with the masked-out weights set to exactly zero."""
    return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), params, masks)


def prune(params, sparsity, *, per_layer: bool = False, prunable=default_prunable):
    """One-shot magnitude pruning: ``(pruned_params, masks)``."""
    masks = magnitude_masks(params, sparsity, per_layer=per_layer, prunable=prunable)
    return apply_masks(params, masks), masks


def polynomial_sparsity(
    final: float, *, begin_step: int, end_step: int, initial: float = 0.0, power: int = 3
) -> Schedule:
    """Gradual sparsity (Zhu & Gupta, 2017): ``s_t = s_f + (s_i - s_f) (1 - p)^power`` with
    ``p = clip((t - begin_step) / (end_step - begin_step), 0, 1)``; 0 before ``begin_step``.

    Pruning fast early (while the network can recover) and slowly near the target.
    """
    _check_sparsity(final, "final sparsity")
    _check_sparsity(initial, "initial sparsity")
    if initial > final:
        raise ValueError(f"initial sparsity {initial} exceeds the final {final}; the schedule must not decrease.")
    if not 0 <= begin_step < end_step:
        raise ValueError(f"need 0 <= begin_step < end_step; got {begin_step}, {end_step}.")
    if power < 1:
        raise ValueError(f"power must be >= 1; got {power}.")

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        p = jnp.clip((t - begin_step) / jnp.float32(end_step - begin_step), 0.0, 1.0)
        s = jnp.float32(final) + jnp.float32(initial - final) * (1.0 - p) ** power
        return jnp.where(t < begin_step, jnp.float32(0.0), s)

    return schedule


class PruningState(NamedTuple):
    count: jax.Array  # int32: updates seen
    masks: Any  # bool pytree like params


def magnitude_pruning(
    schedule: Schedule | float, *, update_every: int = 1, per_layer: bool = False, prunable=default_prunable
) -> optax.GradientTransformation:
    """An optax transform that prunes to ``schedule(step)`` and keeps pruned weights at zero.

    Put it last in an ``optax.chain``. At every ``update_every``-th update the masks are
    recomputed from the would-be new parameters (pruned ones counting as 0); every update is
    then rewritten so that the new parameters are ``mask * (params + updates)``. Needs
    ``params`` in ``update``. A float ``schedule`` is a constant sparsity.
    """
    if update_every < 1:
        raise ValueError(f"update_every must be >= 1; got {update_every}.")
    if not callable(schedule):
        _check_sparsity(schedule)
        target = float(schedule)
        schedule = lambda step: jnp.float32(target)  # noqa: E731

    def init(params):
        return PruningState(
            count=jnp.zeros((), jnp.int32), masks=jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("magnitude_pruning needs the parameters: call tx.update(updates, state, params).")
        candidate = apply_masks(jax.tree.map(lambda p, u: p + u, params, updates), state.masks)
        masks = jax.lax.cond(
            state.count % update_every == 0,
            lambda: magnitude_masks(candidate, schedule(state.count), per_layer=per_layer, prunable=prunable),
            lambda: state.masks,
        )
        new_params = apply_masks(candidate, masks)
        new_updates = jax.tree.map(lambda n, p: n - p, new_params, params)
        return new_updates, PruningState(count=state.count + 1, masks=masks)

    return optax.GradientTransformation(init, update)


def sparsity_report(params, prunable=default_prunable) -> dict:
    """Real sparsity, counted from the weights: ``{"layers": {name: {"zeros", "size",
    "sparsity"}}, "prunable_sparsity", "overall_sparsity"}`` (overall counts every parameter)."""
    layers, zeros, size, all_zeros, all_size = {}, 0, 0, 0, 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.asarray(x)
        z = int(np.count_nonzero(x == 0))
        all_zeros, all_size = all_zeros + z, all_size + x.size
        if prunable(path, x):
            layers[layer_name(path)] = {"zeros": z, "size": int(x.size), "sparsity": z / max(x.size, 1)}
            zeros, size = zeros + z, size + x.size
    return {
        "layers": layers,
        "prunable_sparsity": zeros / max(size, 1),
        "overall_sparsity": all_zeros / max(all_size, 1),
    }
