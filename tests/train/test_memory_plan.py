"""The memory plan: bytes per device from shardings, XLA's figures against a measured peak, and the
refusal of a step that does not fit (with the flags that would make it fit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jkd.train import memory_plan as MP


def test_bytes_per_device_follow_the_shardings():
    mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4])
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    assert MP.per_device_bytes({"x": x, "key": key}) == 8 * 16 * 4 + 8  # a threefry key: two 32-bit words
    split = NamedSharding(mesh, PartitionSpec("data", "model"))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    assert MP.per_device_bytes([x, x], [split, rows]) == 8 * 16 * 4 // 4 + 8 * 16 * 4 // 2
    placed = jax.device_put(np.zeros((8, 16), np.float32), split)
    assert MP.per_device_bytes(placed) == 8 * 16 * 4 // 4  # an array's own sharding


def _plan(**kw):
    base = dict(
        name="student token fkl",
        teacher=500,
        student=100,
        optimizer=200,
        arguments=810,
        outputs=300,
        aliased=300,
        temporaries=700,
        gradients=100,
        loss_chunk=100,
        kv_cache=0,
    )
    return MP.StepMemory(**{**base, **kw})


def test_the_peak_and_the_activations():
    p = _plan()
    assert p.peak == 810 + 300 - 300 + 700
    assert p.activations == 700 - 100 - 100
    assert "peak" in MP.format_plan([p], limit=None, limit_source="x")


def test_a_plan_over_the_limit_is_refused_with_the_flags_that_fit():
    plan = _plan()  # peak 1,510 bytes
    MP.refuse_if_too_large([plan], limit=1510, limit_source="a test", remedies=[])  # fits exactly
    asked = []

    def replan(name, flags):  # as if compiled again: each flag takes 300 bytes off
        asked.append((name, flags))
        return _plan(temporaries=700 - 300 * len(flags))

    with pytest.raises(
        MP.MemoryPlanError,
        match=r"'student token fkl' needs 1 KiB .* \(a test\).* Nothing was "
        r"written; compiled again with --a: 1 KiB; with --a --b: 910 bytes",
    ):
        MP.refuse_if_too_large([plan], limit=1000, limit_source="a test", remedies=["--a", "--b", "--c"], replan=replan)
    assert asked == [("student token fkl", ["--a"]), ("student token fkl", ["--a", "--b"])]  # stops once it fits
    with pytest.raises(MP.MemoryPlanError, match=r"with --a --b --c: 610 bytes; use a smaller --batch-size"):
        MP.refuse_if_too_large([plan], limit=100, limit_source="a test", remedies=["--a", "--b", "--c"], replan=replan)


@pytest.mark.slow
def test_the_plan_is_within_20_percent_of_the_measured_peak():
    """A token-KD step (teacher 4 x 512, student 2 x 256, vocabulary 8,192, 4 x 256 tokens) in a
    fresh process: XLA's planned peak against the resident memory the step reached."""
    script = Path(__file__).with_name("memory_peak_script.py")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)},
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["temporaries"] > r["arguments"] / 2  # the step's own buffers are a real part of it
    assert abs(r["measured"] / r["plan"] - 1) <= 0.2, r
