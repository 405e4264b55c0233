"""Stored teacher outputs against online distillation: epoch time and the student's accuracy.

The demo's pair on the embedded MNIST sample (2x1200 teacher, 784-100-10 student, fixed
views). t = the teacher's forward pass per batch, s = the student's step per batch, both
measured here; the ideal speed-up of an epoch is (t + s) / s. Storing costs one teacher pass
over the training set (reported apart). Accuracy: the same student trained both ways.

    .venv/bin/python benchmarks/stored_teacher.py
"""

from __future__ import annotations

import functools
import statistics
import time

import jax

from common import seconds_per_call
from jkd.data import augment, load_dataset
from jkd.data import pipeline as P
from jkd.jobs.image import load_saved_model
from jkd.models import create_model
from jkd.train import AdamWConfig, create_train_state, eval_step, make_optimizer, objectives, parallel, stored
from jkd.train import teacher_logits, train_step, train_step_stored

BATCH, EPOCHS, T, K = 128, 20, 8.0, 10


def _teacher(run_dir="runs/demo/teacher/model"):
    try:
        return load_saved_model(run_dir)[:2]
    except FileNotFoundError:  # no demo run: a quickly trained teacher would do; an untrained one is enough for speed
        from jkd.train import freeze_model

        return freeze_model(create_model("mlp_2x1200", num_classes=10, input_shape=(28, 28, 1), seed=1))


def run() -> dict:
    ds = load_dataset("jkd_mnist_sample")
    spec = ds.spec
    train = P.reader(ds.split("train"), spec.image_shape)
    test = P.reader(ds.split("test"), spec.image_shape)
    stored.check_fixed_view(crop_padding=0, flip=False)
    fixed = functools.partial(augment.normalize, mean=spec.mean, std=spec.std)
    view = lambda key, images: fixed(images)  # noqa: E731
    view_name = f"normalize{spec.mean}{spec.std}"
    tg, teacher = _teacher()
    steps_per_epoch = len(train) // BATCH
    total = EPOCHS * steps_per_epoch
    tx = make_optimizer(
        AdamWConfig(learning_rate=1e-3, weight_decay=0.0, warmup_epochs=0.0),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
    )
    fresh = lambda: create_train_state(
        create_model("mlp_100", num_classes=10, input_shape=spec.image_shape, seed=0), tx, seed=0
    )  # noqa: E731
    graphdef, _ = fresh()
    online = parallel.single_device(
        functools.partial(train_step, graphdef=graphdef, tx=tx, view_fn=view, teacher_graphdef=tg)
    )
    offline = parallel.single_device(functools.partial(train_step_stored, graphdef=graphdef, tx=tx, view_fn=view))
    forward = jax.jit(lambda images: teacher_logits(tg, teacher, fixed(images)))

    t0 = time.perf_counter()
    outputs = stored.store_teacher_outputs(forward, train, k=K, view=view_name, batch_size=256)
    store_s = time.perf_counter() - t0

    def epoch(step, state, objective, attach, seed):
        batches = P.train_batches(train, batch_size=BATCH, seed=seed, num_epochs=1)
        if attach:
            batches = stored.with_teacher_targets(batches, outputs, source=view_name)
        for b in batches:
            state, m = step(state, b, objective, None if attach else teacher)
        jax.block_until_ready(m["loss"])
        return state

    soft, stored_soft = (
        objectives.SoftKD(temperature=T, kd_weight=0.9, ce_weight=0.1),
        objectives.StoredSoftKD(temperature=T, kd_weight=0.9, ce_weight=0.1),
    )
    states = {"online": fresh()[1], "stored": fresh()[1]}
    times = {"online": [], "stored": []}
    for e in range(EPOCHS):  # interleaved epochs: the same machine noise for both
        for name, step, obj, attach in (("online", online, soft, False), ("stored", offline, stored_soft, True)):
            t0 = time.perf_counter()
            states[name] = epoch(step, states[name], obj, attach, seed=e)
            times[name].append(time.perf_counter() - t0)

    # t and s per batch, measured apart (medians).
    b = next(P.train_batches(train, batch_size=BATCH, seed=0))
    bt = outputs.targets(b, source=view_name)
    jax.block_until_ready(forward(b["image"]))
    t = statistics.median(seconds_per_call(lambda: jax.block_until_ready(forward(b["image"]))) for _ in range(50))
    st = fresh()[1]
    box = {"s": st}

    def one():
        box["s"], m = offline(box["s"], bt, stored_soft, None)
        jax.block_until_ready(m["loss"])

    one()
    s = statistics.median(seconds_per_call(one) for _ in range(50))

    def accuracy(state):
        fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, view_fn=fixed))
        correct = sum(int(fn(state, bb)["correct"]) for bb in P.eval_batches(test, batch_size=256))
        return correct / len(test)

    online_epoch = statistics.median(times["online"][1:])  # the first epoch includes compilation
    stored_epoch = statistics.median(times["stored"][1:])
    ideal = (t + s) / s
    return {
        "pair": "mlp_2x1200 -> mlp_100",
        "batch": BATCH,
        "epochs": EPOCHS,
        "k": K,
        "dataset": spec.name,
        "online_epoch_s": online_epoch,
        "stored_epoch_s": stored_epoch,
        "ratio": online_epoch / stored_epoch,
        "ideal": ideal,
        "fraction_of_ideal": (online_epoch / stored_epoch) / ideal,
        "teacher_forward_ms": 1000 * t,
        "student_step_ms": 1000 * s,
        "store_once_s": store_s,
        "stored_bytes": outputs.nbytes(),
        "online_test_accuracy": accuracy(states["online"]),
        "stored_test_accuracy": accuracy(states["stored"]),
    }


if __name__ == "__main__":
    from common import write

    r = run()
    write("stored_teacher", r)
    print(
        f"stored teacher outputs: epoch {r['stored_epoch_s'] * 1000:.0f} ms vs online "
        f"{r['online_epoch_s'] * 1000:.0f} ms, "
        f"ratio {r['ratio']:.2f} of ideal {r['ideal']:.2f} (t {r['teacher_forward_ms']:.2f} ms, s "
        f"{r['student_step_ms']:.2f} ms) = {100 * r['fraction_of_ideal']:.0f}%; storing once "
        f"{r['store_once_s']:.2f} s, "
        f"{r['stored_bytes'] / 1024:.0f} KB; test accuracy online {100 * r['online_test_accuracy']:.2f} vs stored "
        f"{100 * r['stored_test_accuracy']:.2f}"
    )
