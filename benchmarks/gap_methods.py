"""What each method of the leaderboard costs per step, against soft KD, in one run.

Three students of 784-100-10 under the MLP 2x1200 teacher (the leaderboard's pair), batch 128:
soft KD, function matching (crop + mixup), RKD, SP and CRD, each with independent seeds (each
student its own view and teacher pass), and function matching with the seeds sharing one view
and one teacher pass (``per_student_batches=False``): what the vmapped machinery saves on a
patient schedule. Ratios are step times over soft KD's (lower is cheaper).

    .venv/bin/python benchmarks/gap_methods.py
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from common import seconds_per_call
from jkd.data import augment
from jkd.models import create_model
from jkd.train import (
    AdamWConfig,
    create_train_state,
    freeze_model,
    make_optimizer,
    objectives,
    parallel,
    stack_states,
    train_step_many,
    with_objective_aux,
)

K, BATCH, SHAPE = 3, 128, (28, 28, 1)


def run(rounds: int = 3, steps: int = 10) -> dict:
    tg, teacher = freeze_model(create_model("mlp_2x1200", num_classes=10, input_shape=SHAPE, seed=100, dropout=0.2))
    tx = make_optimizer(
        AdamWConfig(learning_rate=1e-3, weight_decay=0.0, warmup_epochs=0.0), steps_per_epoch=31, total_steps=5000
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, K, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, (BATCH, K)).astype(np.int32)
    per_student = {"image": images, "label": labels}
    shared = {"image": images[:, 0], "label": labels[:, 0]}
    crop = functools.partial(augment.augment, mean=(0.13,), std=(0.3,), crop_padding=2)
    mixed = functools.partial(crop, mixup_alpha=1.0)
    settings = {
        "soft KD": (objectives.SoftKD(temperature=8.0), crop, True),
        "function matching": (objectives.FunctionMatching(), mixed, True),
        "function matching, shared teacher pass": (objectives.FunctionMatching(), mixed, False),
        "RKD": (objectives.RKD(), crop, True),
        "SP": (objectives.SP(), crop, True),
        "CRD": (objectives.CRD(), crop, True),
    }
    example = crop(jax.random.key(0), np.zeros((2, *SHAPE), np.uint8))
    times = {}
    for name, (obj, view, independent) in settings.items():
        made = [
            create_train_state(create_model("mlp_100", num_classes=10, input_shape=SHAPE, seed=i), tx, seed=i)
            for i in range(K)
        ]
        g = made[0][0]
        states = stack_states(
            [
                with_objective_aux(
                    st, obj, tx, graphdef=g, teacher_graphdef=tg, teacher=teacher, example=example, seed=i
                )
                for i, (_, st) in enumerate(made)
            ]
        )
        objs = objectives.stack([obj] * K) if jax.tree.leaves(obj) else obj
        step = parallel.single_device(
            functools.partial(
                train_step_many, graphdef=g, tx=tx, view_fn=view, teacher_graphdef=tg, per_student_batches=independent
            )
        )
        batch = per_student if independent else shared
        box = {"s": states}

        def call(step=step, objs=objs, batch=batch, box=box):
            for _ in range(steps):
                box["s"], m = step(box["s"], batch, objs, teacher)
            jax.block_until_ready(m["loss"])

        call()  # compile
        times[name] = seconds_per_call(call, calls=rounds) / steps
    base = times["soft KD"]
    return {
        "ms_per_step": {k: 1e3 * v for k, v in times.items()},
        "ratio_vs_soft_kd": {k: v / base for k, v in times.items()},
        "students": K,
        "batch": BATCH,
    }


if __name__ == "__main__":
    r = run()
    for k, v in r["ms_per_step"].items():
        print(f"{k:42s} {v:7.2f} ms/step  x{r['ratio_vs_soft_kd'][k]:.2f} of soft KD")
