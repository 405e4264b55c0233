"""The pmap runner against the mesh runner on 4 CPU devices, and pmap's cost of re-replicating.

One distillation step (MLP 2x1200 teacher forward, 784-100-10 student step, batch 256) run by
``on_mesh`` (jit over a 4-device mesh), by ``with_pmap`` on a state placed once (``run.place``,
how the fit loop drives it now) and by ``with_pmap`` on a plain state (replicated onto the
devices and unreplicated every step, how the fit loop drove it before). Medians of interleaved
rounds; ``ratio`` = pmap placed / mesh step time (target <= 1.1).

    .venv/bin/python benchmarks/runners.py      (4 CPU devices are set here, before JAX starts)

The ``cnn`` pair has BatchNorm: under ``pmap`` jkd's BatchNorm ``psum``-s its statistics and
backward sums (its fast path), on the mesh it runs as on one device.
"""

from __future__ import annotations

import functools
import statistics

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402

from common import seconds_per_call  # noqa: E402
from jkd.data import augment  # noqa: E402
from jkd.models import create_model  # noqa: E402
from jkd.train import AdamWConfig, create_train_state, freeze_model, make_optimizer, objectives, parallel, train_step  # noqa: E402


PAIRS = {
    "mlp": ("mlp_2x1200", "mlp_100", {}, (28, 28, 1), 256),
    "cnn": ("cnn", "cnn", {"width": 16}, (32, 32, 3), 128),
}  # BatchNorm: psum-ed under pmap


def run(pair: str = "mlp", rounds: int = 5, steps: int = 20) -> dict:
    t_name, s_name, s_options, shape, batch = PAIRS[pair]
    tg, teacher = freeze_model(create_model(t_name, num_classes=10, input_shape=shape, seed=100))
    tx = make_optimizer(AdamWConfig(), steps_per_epoch=100, total_steps=10_000)
    c = shape[-1]
    view = functools.partial(augment.augment, mean=(0.5,) * c, std=(0.25,) * c, crop_padding=2)

    def student(bn_axis_name=None):
        model = create_model(s_name, num_classes=10, input_shape=shape, seed=0, bn_axis_name=bn_axis_name, **s_options)
        g, state = create_train_state(model, tx, seed=0)
        return state, functools.partial(train_step, graphdef=g, tx=tx, view_fn=view, teacher_graphdef=tg)

    state, step = student()
    pmap_state, pmap_step = student(bn_axis_name=parallel.AXIS)
    mesh = parallel.on_mesh(step, parallel.data_mesh(4))
    pmap = parallel.with_pmap(pmap_step, 4)
    rng = np.random.default_rng(0)
    b = {
        "image": rng.integers(0, 256, (batch, *shape), dtype=np.uint8),
        "label": rng.integers(0, 10, batch).astype(np.int32),
    }
    obj = objectives.SoftKD()
    copy = lambda s: jax.tree.map(lambda x: x.copy(), s)  # noqa: E731 - each runner donates its own
    box = {"mesh": copy(state), "placed": pmap.place(copy(pmap_state)), "plain": copy(pmap_state)}

    def runner(name, fn):
        def go():
            for _ in range(steps):
                box[name], m = fn(box[name], b, obj, teacher)
            jax.block_until_ready(m["loss"])

        return go

    calls = {"mesh": runner("mesh", mesh), "placed": runner("placed", pmap), "plain": runner("plain", pmap)}
    for fn in calls.values():
        fn()  # compile
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(seconds_per_call(fn) / steps)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    return {
        "pair": f"{t_name} -> {s_name} {s_options or ''}",
        "batch": batch,
        "devices": 4,
        "ms_per_step": ms,
        "ratio": ms["placed"] / ms["mesh"],
        "ratio_before": ms["plain"] / ms["mesh"],
        "target": 1.1,
    }


if __name__ == "__main__":
    from common import write

    for pair in PAIRS:
        r = run(pair)
        write(f"runners_{pair}", r)
        ms = r["ms_per_step"]
        print(
            f"{r['pair']}, 4 CPU devices, batch {r['batch']}: mesh {ms['mesh']:.2f} ms/step, pmap "
            f"placed once {ms['placed']:.2f} "
            f"(ratio {r['ratio']:.2f}, target <= {r['target']}), pmap re-replicated per step {ms['plain']:.2f} "
            f"(ratio {r['ratio_before']:.2f})"
        )
