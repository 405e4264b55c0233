"""Is the input pipeline the bottleneck? A distillation step fed by the real grain pipeline
vs the same step fed from batches already in device memory, side by side in one process.

Run: `make bench` (or `.venv/bin/python benchmarks/data_pipeline.py`). Target: ratio >= 0.90.
Writes the entry "data_pipeline" of runs/bench/results.json.
"""

from __future__ import annotations

import sys
import tempfile
import time

import functools

import jax
import jax.numpy as jnp

from jkd.data import augment, load_dataset
from jkd.data import pipeline as P
from jkd.models import create_model
from jkd.train import SGDConfig, create_train_state, freeze_model, make_optimizer, objectives, train_step

BATCH, STEPS, REPEATS = 128, 200, 5


def make_step(spec, teacher_graphdef, student_graphdef, tx):
    view = functools.partial(augment.augment, mean=spec.mean, std=spec.std, crop_padding=2)
    return jax.jit(
        functools.partial(
            train_step, graphdef=student_graphdef, tx=tx, view_fn=view, teacher_graphdef=teacher_graphdef
        ),
        donate_argnums=0,
    )


def run(data_dir: str | None = None) -> dict:
    ds = load_dataset(data_dir=data_dir or tempfile.mkdtemp())
    data = P.reader(ds.split("train"), ds.spec.image_shape)
    shape, classes = ds.spec.image_shape, ds.spec.num_classes
    tg, teacher = freeze_model(create_model("mlp_2x1200", num_classes=classes, input_shape=shape))
    tx = make_optimizer(SGDConfig(learning_rate=0.01, decay_epochs=()), steps_per_epoch=1, total_steps=STEPS)
    g, student = create_train_state(create_model("mlp_100", num_classes=classes, input_shape=shape), tx, seed=0)
    step = make_step(ds.spec, tg, g, tx)
    objective = objectives.SoftKD(temperature=4.0)

    # Baseline: the same batches, sliced in advance and already on the device.
    it = P.train_batches(data, batch_size=BATCH, seed=0)
    dev = [jax.tree.map(jnp.asarray, next(it)) for _ in range(STEPS)]

    def timed(feed) -> float:
        s = jax.tree.map(jnp.copy, student)
        metrics = None
        t0 = time.perf_counter()
        for b in feed():
            s, metrics = step(s, b, objective, teacher)
        jax.block_until_ready(metrics)
        return STEPS * BATCH / (time.perf_counter() - t0)

    def from_memory():
        return iter(dev)

    def from_pipeline():
        stream = P.train_batches(data, batch_size=BATCH, seed=0)
        for _ in range(STEPS):
            yield next(stream)

    timed(from_memory)  # compile and warm up
    mem, pipe = [], []
    for _ in range(REPEATS):  # interleaved, best of each
        mem.append(timed(from_memory))
        pipe.append(timed(from_pipeline))
    return {
        "what": "Flax MLP 2x1200 -> mlp_100 SoftKD train_step, batch 128, embedded MNIST sample",
        "jkd_images_per_s": max(pipe),
        "comparison_images_per_s": max(mem),
        "comparison": "batches already in device memory",
        "ratio": max(pipe) / max(mem),
        "target": 0.90,
    }


if __name__ == "__main__":
    from common import write

    r = run(sys.argv[1] if len(sys.argv) > 1 else None)
    write("data_pipeline", r)
    print(
        f"pipeline {r['jkd_images_per_s']:.0f} img/s, in memory {r['comparison_images_per_s']:.0f} "
        f"img/s, ratio {r['ratio']:.3f} (target >= {r['target']})"
    )
