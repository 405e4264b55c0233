"""K students in one vmapped step sharing one teacher forward, against K separate runs.

With t the teacher's forward pass and s one student's step (forward, backward, update), K
separate runs cost K (t + s) per batch and the vmapped step ideally t + K s: the ideal speed-up
is K (t + s) / (t + K s). t and s are measured in the same run; ``ratio`` is the measured
speed-up, ``ideal`` the bound, higher is better.

    .venv/bin/python benchmarks/many_students.py [mlp|cnn] [sequential]
"""

from __future__ import annotations

import functools
import statistics
import sys

import jax
import numpy as np

from common import seconds_per_call
from jkd.data import augment
from jkd.models import create_model
from jkd.train import SGDConfig, create_train_state, freeze_model, make_optimizer, objectives, parallel
from jkd.train import stack_states, train_step, train_step_many
from jkd.train.steps import teacher_logits

PAIRS = {"cnn": ("resnet32x4", "resnet8x4", (32, 32, 3), 64), "mlp": ("mlp_2x1200", "mlp_100", (28, 28, 1), 256)}


def run(pair: str = "cnn", k: int = 8, rounds: int = 3, steps: int = 2, sequential: bool = False) -> dict:
    t_name, s_name, shape, batch = PAIRS[pair]
    tg, teacher = freeze_model(create_model(t_name, num_classes=10, input_shape=shape, seed=100))
    tx = make_optimizer(SGDConfig(learning_rate=0.05, decay_epochs=()), steps_per_epoch=100, total_steps=10_000)
    made = [
        create_train_state(create_model(s_name, num_classes=10, input_shape=shape, seed=i), tx, seed=i)
        for i in range(k)
    ]
    graphdef = made[0][0]
    view = lambda key, images: augment.normalize(images, (0.5,) * shape[-1], (0.25,) * shape[-1])  # noqa: E731
    one = parallel.single_device(
        functools.partial(train_step, graphdef=graphdef, tx=tx, view_fn=view, teacher_graphdef=tg)
    )
    many = parallel.single_device(
        functools.partial(
            train_step_many, graphdef=graphdef, tx=tx, view_fn=view, teacher_graphdef=tg, sequential=sequential
        )
    )
    forward = jax.jit(lambda images: teacher_logits(tg, teacher, view(None, images)))
    rng = np.random.default_rng(0)
    b = {
        "image": rng.integers(0, 256, (batch, *shape), dtype=np.uint8),
        "label": rng.integers(0, 10, batch).astype(np.int32),
    }
    obj = objectives.SoftKD(temperature=4.0, kd_weight=0.9, ce_weight=0.1)
    objs = objectives.stack([obj] * k)
    box = {"single": [m[1] for m in made], "stacked": stack_states([m[1] for m in made])}

    def separate():  # K runs, one after the other, each with its own teacher forward
        for i in range(k):
            box["single"][i], m = one(box["single"][i], b, obj, teacher)
        jax.block_until_ready(m["loss"])

    def together():
        box["stacked"], m = many(box["stacked"], b, objs, teacher)
        jax.block_until_ready(m["loss"])

    def single():
        box["single"][0], m = one(box["single"][0], b, obj, teacher)
        jax.block_until_ready(m["loss"])

    teacher_only = lambda: jax.block_until_ready(forward(b["image"]))  # noqa: E731
    separate(), together(), teacher_only()  # compile
    times = {"separate": [], "together": [], "single": [], "teacher": []}
    for _ in range(rounds):
        times["separate"].append(seconds_per_call(separate, steps))
        times["together"].append(seconds_per_call(together, steps))
        times["single"].append(seconds_per_call(single, steps))
        times["teacher"].append(seconds_per_call(teacher_only, steps))
    med = {name: statistics.median(v) for name, v in times.items()}
    t = med["teacher"]
    s = max(med["single"] - t, 1e-9)
    ideal = k * (t + s) / (t + k * s)
    ratio = med["separate"] / med["together"]
    return {
        "pair": f"{t_name} -> {k} x {s_name}",
        "batch": batch,
        "k": k,
        "ratio": ratio,
        "ideal": ideal,
        "students": "unrolled (sequential)" if sequential else "vmap",
        "fraction_of_ideal": ratio / ideal,
        "teacher_forward_ms": 1000 * t,
        "student_step_ms": 1000 * s,
        "separate_ms": 1000 * med["separate"],
        "together_ms": 1000 * med["together"],
    }


if __name__ == "__main__":
    from common import write

    pair = sys.argv[1] if len(sys.argv) > 1 else "cnn"
    sequential = len(sys.argv) > 2 and sys.argv[2] == "sequential"
    r = run(pair, sequential=sequential)
    write(f"many_students_{pair}" + ("_sequential" if sequential else ""), r)
    print(
        f"{r['pair']} (batch {r['batch']}, {r['students']}): {r['together_ms']:.0f} ms together vs "
        f"{r['separate_ms']:.0f} ms separate, "
        f"speed-up {r['ratio']:.2f} of ideal {r['ideal']:.2f} (t {r['teacher_forward_ms']:.0f} ms, s "
        f"{r['student_step_ms']:.0f} ms) = {100 * r['fraction_of_ideal']:.0f}%"
    )
