"""What a train step will hold in each device's memory, from XLA's compiled memory analysis, before
the step runs: the plan a job prints first and the refusal of one that does not fit.

XLA reports four figures for a compiled step (per device under SPMD): its arguments (the state,
the batch, the frozen teacher), its outputs, the bytes where an output reuses a donated argument,
and its temporaries. The peak is ``arguments + outputs - aliased + temporaries``. The plan names
the arguments' parts from the arrays' shardings (teacher weights, student weights, optimizer
state) and, inside the temporaries, the parts a formula gives (the gradients: one per master
weight; the fused loss's ``[chunk, vocabulary]`` float32 blocks; the on-policy sampler's KV cache);
what remains of the temporaries is the activations kept for the backward pass and XLA's other
buffers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import numpy as np

GiB = 2**30


def per_device_bytes(tree, shardings=None) -> int:
    """Bytes of ``tree``'s arrays (or ``jax.ShapeDtypeStruct``) on one device: each leaf's shard
    under ``shardings`` (a tree of shardings, one sharding, or None: each leaf's own, else whole)."""
    leaves = jax.tree.leaves(tree)
    if shardings is None or not isinstance(shardings, (list, tuple, dict)) and hasattr(shardings, "shard_shape"):
        specs = [shardings] * len(leaves)
    else:
        specs = jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "shard_shape"))
    total = 0
    for x, s in zip(leaves, specs):
        s = s if s is not None else getattr(x, "sharding", None)
        shape = s.shard_shape(tuple(x.shape)) if s is not None else tuple(x.shape)
        total += math.prod(shape) * _itemsize(x.dtype)
    return int(total)


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # a random key: its words of key data
        return 4 * math.prod(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)
    return np.dtype(dtype).itemsize


def device_memory() -> int | None:
    """The bytes one local device can hold, where the backend reports them (GPUs, TPUs; not the CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without the call
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """One step's plan, bytes per device.

    From the arrays: ``teacher`` (its frozen weights), ``student`` (the master weights of every
    seed), ``optimizer`` (the optimizer's state). From XLA: ``arguments``, ``outputs``, ``aliased``,
    ``temporaries``. From formulas, parts of the temporaries: ``gradients``, ``loss_chunk``,
    ``kv_cache``.
    """

    name: str
    teacher: int
    student: int
    optimizer: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    gradients: int
    loss_chunk: int
    kv_cache: int = 0

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def activations(self) -> int:
        """The temporaries other than the gradients, the loss's chunk and the KV cache."""
        return max(self.temporaries - self.gradients - self.loss_chunk - self.kv_cache, 0)


def compiled_step_memory(
    lowered,
    *,
    name: str,
    teacher: int,
    student: int,
    optimizer: int,
    gradients: int,
    loss_chunk: int,
    kv_cache: int = 0,
) -> StepMemory | None:
    """``lowered`` (``jit(step).lower(...)``) compiled, and its memory analysis as a :class:`StepMemory`;
    None where the backend gives no analysis. Compiling here costs nothing later: calling the same
    jitted function with arguments of these shapes and shardings reuses the executable."""
    stats = lowered.compile().memory_analysis()
    if stats is None:
        return None
    return StepMemory(
        name=name,
        teacher=teacher,
        student=student,
        optimizer=optimizer,
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes),
        gradients=gradients,
        loss_chunk=loss_chunk,
        kv_cache=kv_cache,
    )


def fused_loss_chunk(tokens: int, chunk: int, vocab: int, *, with_teacher: bool, seeds: int = 1) -> int:
    """Bytes of the fused loss's live ``[chunk, vocabulary]`` float32 blocks: the student's logits
    and their gradient, and the teacher's logits when a teacher is scored."""
    blocks = 3 if with_teacher else 2
    return int(blocks * min(chunk, tokens) * vocab * 4 * seeds)


def kv_cache_bytes(
    *, layers: int, rows: int, slots: int, kv_heads: int, head_dim: int, seeds: int = 1, itemsize: int = 4
) -> int:
    """Bytes of a decoder's key/value cache for ``rows`` sequences of ``slots`` positions."""
    return int(2 * layers * rows * slots * kv_heads * head_dim * itemsize * seeds)


def _mib(n: int) -> str:
    if n < 2**10:
        return f"{n} bytes"
    if n < 2**20:
        return f"{n / 2**10:,.0f} KiB"
    return f"{n / 2**20:,.0f} MiB" if n < 10 * GiB else f"{n / GiB:,.1f} GiB"


COLUMNS = ("teacher", "student", "optimizer", "gradients", "activations", "loss chunk", "KV cache", "peak")


def format_plan(plans: Sequence[StepMemory], *, limit: int | None, limit_source: str) -> str:
    """The plan as a table, one row per step, against ``limit`` bytes per device."""
    width = max(len(p.name) for p in plans)
    head = f"  {'step':<{width}}  " + "  ".join(f"{c:>11}" for c in COLUMNS)
    rows = [
        f"  {p.name:<{width}}  "
        + "  ".join(
            f"{_mib(v):>11}"
            for v in (p.teacher, p.student, p.optimizer, p.gradients, p.activations, p.loss_chunk, p.kv_cache, p.peak)
        )
        for p in plans
    ]
    against = (
        f"against {_mib(limit)} per device ({limit_source})"
        if limit is not None
        else f"no memory limit known ({limit_source})"
    )
    return "\n".join([f"memory plan per device (XLA's compiled memory analysis), {against}:", head, *rows])


class MemoryPlanError(ValueError):
    """A step's planned peak exceeds the memory limit; raised before the run folder is written."""


def refuse_if_too_large(
    plans: Sequence[StepMemory],
    *,
    limit: int | None,
    limit_source: str,
    remedies: Sequence[str] = (),
    replan: Callable[[str, list[str]], StepMemory | None] | None = None,
) -> None:
    """Raise :class:`MemoryPlanError` when a step's peak exceeds ``limit``, naming the step and its
    figures. ``replan(step name, flags)`` compiles that step again with the first 1, 2, ... of
    ``remedies`` (flags) in effect; the message gives each compiled peak, up to the first that fits."""
    if limit is None:
        return
    over = [p for p in plans if p.peak > limit]
    if not over:
        return
    worst = max(over, key=lambda p: p.peak)
    tried, fits = [], False
    for i in range(len(remedies) if replan is not None else 0):
        step = replan(worst.name, list(remedies[: i + 1]))
        if step is None:
            break
        tried.append(f"with {' '.join(remedies[: i + 1])}: {_mib(step.peak)}")
        if step.peak <= limit:
            fits = True
            break
    found = ("; compiled again " + "; ".join(tried) + (" (fits)" if fits else "")) if tried else ""
    advice = (
        ""
        if fits
        else (
            "; use a smaller --batch-size or --max-length, a smaller student, or more devices (--mesh data=D,model=M)"
        )
    )
    raise MemoryPlanError(
        f"the step {worst.name!r} needs {_mib(worst.peak)} per device, more than the {_mib(limit)} available "
        f"({limit_source}): teacher {_mib(worst.teacher)}, student {_mib(worst.student)}, optimizer "
        f"{_mib(worst.optimizer)}, gradients {_mib(worst.gradients)}, activations "
        f"{_mib(worst.activations)}, loss chunk "
        f"{_mib(worst.loss_chunk)}, KV cache {_mib(worst.kv_cache)}. Nothing was written{found}{advice}."
    )
