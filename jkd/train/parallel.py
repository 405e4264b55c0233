"""The same step on one device, on a ``('data',)`` mesh with ``jit``, or with ``pmap``.

* ``single_device``: ``jit`` with the state donated.
* ``on_mesh``: ``jit`` over a 1-D ``('data',)`` mesh: the batch is sharded along its first
  axis, the state (and teacher, objective) replicated. XLA inserts the collectives; BatchNorm
  statistics and the loss are over the global batch, exactly as on one device. Multi-host:
  each process passes its own share of the global batch (``process_count`` shares).
* ``with_pmap``: ``jax.pmap`` over local devices with ``axis_name="data"``: gradients and
  metrics are averaged with ``lax.pmean``; models must be built with ``bn_axis_name="data"``
  so BatchNorm averages its statistics across devices.

All three return ``run(state, batch, objective, teacher=None) -> (state, metrics)`` on
unreplicated states, so the fit loop does not know which one it drives. Each ``run`` also has
``run.place(state)`` and ``run.fetch(placed)``: the fit loop places the state once, steps the
placed state, and fetches it only to evaluate and save. For one device and the mesh both are
the identity; for ``pmap`` they replicate onto the devices and take device 0's copy back, so a
pmapped state stays on the devices between steps instead of being re-replicated every step.
Random views are the same on every runner and device count (see :func:`jkd.train.steps._view`).
"""

from __future__ import annotations

import functools
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``('data',)`` mesh over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices must lie in [1, {len(devices)}] (devices available); got {n}.")
    return Mesh(np.asarray(devices[:n]), (AXIS,), axis_types=(AxisType.Auto,))


def batch_size(batch: dict) -> int:
    """Examples in a batch: images (``label``) or sequences (``tokens``)."""
    return len(batch["label"] if "label" in batch else batch["tokens"])


def check_batch(batch: dict, divisor: int, what: str) -> None:
    """A clear error when the batch cannot be split evenly."""
    b = batch_size(batch)
    if b % divisor:
        raise ValueError(
            f"batch size {b} is not divisible by the {what} ({divisor}); choose a batch size that "
            f"is a multiple of {divisor}."
        )


def _identity(tree):
    return tree


def _with_placement(run: Callable, place: Callable = _identity, fetch: Callable = _identity) -> Callable:
    run.place, run.fetch = place, fetch
    return run


def place(run: Callable, state):
    """``run.place(state)`` if the runner has it (any plain callable works on states as they are)."""
    return getattr(run, "place", _identity)(state)


def fetch(run: Callable, state):
    """``run.fetch(state)`` if the runner has it."""
    return getattr(run, "fetch", _identity)(state)


def put_global(tree, shardings):
    """``tree``'s arrays placed by ``shardings`` (one sharding for all, or a tree of them matching
    ``tree``), across processes too (each process passes the same values; PRNG keys included).
    Arrays already so placed are kept."""

    def one(x, sharding):
        if not isinstance(x, (jax.Array, np.ndarray)):
            return x
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        # Through host memory: a device's array cannot be sent to other processes' devices, and
        # device_put takes no PRNG keys across processes.
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                jax.device_put(np.asarray(jax.random.key_data(x)), sharding), impl=jax.random.key_impl(x)
            )
        return jax.device_put(np.asarray(x), sharding)

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def replicated(tree, mesh: Mesh):
    """``tree`` as arrays replicated on every device of ``mesh`` (:func:`put_global`)."""
    return put_global(tree, NamedSharding(mesh, PartitionSpec()))


def place_frozen(run: Callable, tree):
    """``run.place_frozen(tree)`` if the runner has it: the teacher placed once for all steps."""
    return getattr(run, "place_frozen", _identity)(tree)


def single_device(step: Callable) -> Callable:
    """``jit`` the step (state buffers donated)."""
    jitted = jax.jit(step, donate_argnums=0)

    def run(state, batch, objective, teacher=None):
        return jitted(state, batch, objective, teacher)

    run = _with_placement(run)
    run.lower = jitted.lower  # the compiled module and its memory, as on_mesh's runner gives them
    run.local_rows = lambda n: np.arange(n)
    return run


def on_mesh(step: Callable, mesh: Mesh, *, shardings: Callable | None = None) -> Callable:
    """``jit`` over ``mesh``: the batch sharded on ``'data'`` (its first axis); the state and the
    teacher replicated, or placed by ``shardings(tree, mesh) -> tree of NamedSharding`` (e.g.
    :func:`jkd.models.decoder_sharding.tree_shardings`: a decoder's matrices split over
    ``('data', 'model')``, its optimizer moments alike), the objective replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(AXIS))
    layout = (lambda tree: rep) if shardings is None else (lambda tree: rep if tree is None else shardings(tree, mesh))
    compiled: dict = {}
    divisor = max(mesh.shape[AXIS] // jax.process_count(), 1)

    def jitted(state, teacher):
        key = (jax.tree.structure(state), jax.tree.structure(teacher))
        if key not in compiled:  # the shardings follow the trees (one compilation per state layout)
            st = layout(state)
            compiled[key] = jax.jit(
                step, in_shardings=(st, sharded, rep, layout(teacher)), out_shardings=(st, rep), donate_argnums=0
            )
        return compiled[key]

    def global_batch(batch):
        check_batch(batch, divisor, "number of this process's devices along the mesh's data axis")
        return {k: jax.make_array_from_process_local_data(sharded, np.asarray(v)) for k, v in batch.items()}

    def run(state, batch, objective, teacher=None):
        return jitted(state, teacher)(state, global_batch(batch), objective, teacher)

    def lower(state, batch, objective, teacher=None):
        """The step as XLA lowers it for these arguments (``.compile().as_text()``: the
        partitioned module, ``.compile().memory_analysis()``: its memory per device)."""
        return jitted(state, teacher).lower(state, global_batch(batch), objective, teacher)

    # The teacher is placed once, not copied onto the mesh at every step; so is a restored state,
    # which in a run of several processes must span all their devices.
    run = _with_placement(run) if shardings is None else _with_placement(run, lambda s: put_global(s, layout(s)))
    run.place_frozen = lambda tree: put_global(tree, layout(tree))
    run.state_sharding = rep if shardings is None else layout
    run.lower = lower
    run.local_rows = functools.partial(local_rows, sharded)
    return run


def all_gather_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """The result shapes of every all-gather in a compiled module's text (``run.lower(...)
    .compile().as_text()``), the asynchronous ``all-gather-start`` form's too: to check what a
    partitioned step gathers (e.g. never the whole vocabulary)."""
    shapes = []
    for line in hlo_text.splitlines():
        head, sep, _ = line.partition(" all-gather")
        if sep and "=" in head:
            result = head.split("=", 1)[1]
            shapes += [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", result)]
    return shapes


def local_rows(sharding: NamedSharding, n: int) -> np.ndarray:
    """The rows of an ``n``-row global batch that this process feeds under ``sharding`` (those its
    devices hold, in order): pass ``batch[local_rows(...)]`` to a runner of several processes."""
    starts = sorted(
        {
            (idx[0].start or 0, n if idx[0].stop is None else idx[0].stop)
            for idx in sharding.addressable_devices_indices_map((n,)).values()
        }
    )
    return np.concatenate([np.arange(a, b) for a, b in starts])


def replicate(tree, devices):
    """One copy per device, stacked on a new leading axis and placed one per device
    (the layout ``pmap`` expects for a mapped argument)."""
    n = len(devices)
    per_device = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (n, *jnp.shape(x))), per_device), tree)


def unreplicate(tree):
    """Device 0's copy of a pmapped tree, as arrays on the first device.

    Each leaf's first row is read from the shard that holds it, with no computation across the
    devices: ``x[0]`` on a leaf split over the devices compiles a program on all of them (a
    collective per leaf), and on CPU devices dozens of those queued behind a step deadlock XLA's
    rendezvous."""

    def first(x):
        if not isinstance(x, jax.Array) or len(x.addressable_shards) < 2:
            return x[0]
        shard = next(s for s in x.addressable_shards if (s.index[0].start or 0) == 0)
        return shard.data[0]

    return jax.tree.map(first, tree)


class Replicated:
    """A state placed on the devices of a ``pmap`` runner: one copy per device. Opaque on purpose:
    only its runner steps it, and ``run.fetch`` turns it back into a state."""

    def __init__(self, tree):
        self.tree = tree


def with_pmap(step: Callable, num_devices: int | None = None) -> Callable:
    """``pmap`` the step over local devices; ``step`` must take ``axis_name`` (it gets "data").

    ``run(state, ...)`` on a plain state replicates it, steps, and returns device 0's copy;
    ``run(run.place(state), ...)`` steps a placed state and returns it placed, with the metrics
    of every device (``[devices, ...]``, equal after ``pmean``), so nothing is copied per step.
    """
    n = jax.local_device_count() if num_devices is None else num_devices
    if not 1 <= n <= jax.local_device_count():
        raise ValueError(f"num_devices must lie in [1, {jax.local_device_count()}] (local devices available); got {n}.")
    devices = jax.local_devices()[:n]
    pmapped = jax.pmap(
        functools.partial(step, axis_name=AXIS),
        axis_name=AXIS,
        in_axes=(0, 0, None, None),
        devices=devices,
        donate_argnums=0,
    )

    def run(state, batch, objective, teacher=None):
        check_batch(batch, n, "number of devices")
        shards = jax.tree.map(lambda x: np.asarray(x).reshape(n, -1, *np.shape(x)[1:]), batch)
        if isinstance(state, Replicated):
            new_state, metrics = pmapped(state.tree, shards, objective, teacher)
            return Replicated(new_state), metrics
        new_state, metrics = pmapped(replicate(state, devices), shards, objective, teacher)
        return unreplicate(new_state), unreplicate(metrics)

    return _with_placement(
        run, place=lambda state: Replicated(replicate(state, devices)), fetch=lambda placed: unreplicate(placed.tree)
    )
