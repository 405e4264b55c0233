"""Is the input pipeline the bottleneck? A distillation step fed by the real grain pipeline
vs the same step fed from batches already in device memory, side by side in one process.

Run: `make bench` (or `.venv/bin/python benchmarks/data_pipeline.py`). Target: ratio >= 0.90.
Writes the entry "data_pipeline" of runs/bench/results.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jkd import losses
from jkd.data import augment, load_dataset
from jkd.data import pipeline as P
from jkd.quickdemo import init_mlp, mlp

BATCH, STEPS, REPEATS = 128, 200, 5


def make_step(spec):
    opt = optax.sgd(0.01, momentum=0.9)

    @jax.jit
    def step(student, opt_state, teacher, key, images, labels):
        view = augment.augment(key, images, mean=spec.mean, std=spec.std, crop_padding=2)
        x = view.reshape(view.shape[0], -1)
        t = jax.lax.stop_gradient(mlp(teacher, x))

        def loss_fn(p):
            s = mlp(p, x)
            kd = losses.soft_distillation_loss(s, t, temperature=4.0)
            return losses.distillation_objective(s, labels, kd, kd_weight=0.9, ce_weight=0.1).mean()

        loss, g = jax.value_and_grad(loss_fn)(student)
        updates, opt_state = opt.update(g, opt_state, student)
        return optax.apply_updates(student, updates), opt_state, loss

    return opt, step


def run(data_dir: str | None = None) -> dict:
    ds = load_dataset(data_dir=data_dir or tempfile.mkdtemp())
    data = P.reader(ds.split("train"), ds.spec.image_shape)
    opt, step = make_step(ds.spec)
    teacher = init_mlp(jax.random.key(0), (784, 1200, 1200, 10))
    student = init_mlp(jax.random.key(1), (784, 100, 10))
    keys = jax.random.split(jax.random.key(2), STEPS)

    # Baseline: the same batches, sliced in advance and already on the device.
    it = P.train_batches(data, batch_size=BATCH, seed=0)
    pre = [next(it) for _ in range(STEPS)]
    dev = [(jnp.asarray(b["image"]), jnp.asarray(b["label"])) for b in pre]

    def timed(feed) -> float:
        s, o = student, opt.init(student)
        loss = None
        t0 = time.perf_counter()
        for i, (im, lb) in enumerate(feed()):
            s, o, loss = step(s, o, teacher, keys[i], im, lb)
        jax.block_until_ready(loss)
        return STEPS * BATCH / (time.perf_counter() - t0)

    def from_memory():
        return iter(dev)

    def from_pipeline():
        stream = P.train_batches(data, batch_size=BATCH, seed=0)
        for _ in range(STEPS):
            b = next(stream)
            yield b["image"], b["label"]

    timed(from_memory)  # compile and warm up
    mem, pipe = [], []
    for _ in range(REPEATS):  # interleaved, best of each
        mem.append(timed(from_memory))
        pipe.append(timed(from_pipeline))
    result = {
        "what": "MLP 2x1200 -> 784-100-10 soft-KD step, batch 128, embedded MNIST sample",
        "jkd_images_per_s": max(pipe),
        "comparison_images_per_s": max(mem),
        "comparison": "batches already in device memory",
        "ratio": max(pipe) / max(mem),
        "target": 0.90,
    }
    return result


def write(entry: str, result: dict, path: Path = Path("runs/bench/results.json")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[entry] = result
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    r = run(sys.argv[1] if len(sys.argv) > 1 else None)
    write("data_pipeline", r)
    print(f"pipeline {r['jkd_images_per_s']:.0f} img/s, in memory {r['comparison_images_per_s']:.0f} "
          f"img/s, ratio {r['ratio']:.3f} (target >= {r['target']})")
