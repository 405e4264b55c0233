"""The cost of the host boundary: one distillation step run by 2 processes x 2 CPU devices
(joined by ``jax.distributed`` over localhost, gloo collectives) against 1 process x 4 devices.

The step is the demo's (MLP 2x1200 teacher forward, 784-100-10 student, soft KD), global batch
256, on the ``('data',)`` mesh (``parallel.on_mesh``, the teacher placed once); in the 2-process
run each process feeds its half of every batch, as ``jkd train-teacher``/``distill`` do. The
two set-ups cannot share one process, so they alternate (1, 2, 1, 2, ...) in fresh processes
and the medians are compared: ``ratio`` = 1-process / 2-process step time (1.0: the boundary
costs nothing; lower: it costs). Both run on this machine's 2 cores, so the 2-process run also
pays for two Python processes on the same cores; on real hosts each has its own.

    .venv/bin/python benchmarks/multihost.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import portpicker

STEPS, ROUNDS, BATCH = 20, 5, 256


def worker(process_id: int, num_processes: int, port: int) -> None:
    import functools
    import time

    import jkd

    jkd.initialize()  # the settings jkd's commands run with
    import jax

    jax.config.update("jax_num_cpu_devices", 4 // num_processes)
    from jkd.runtime import hosts

    if num_processes > 1:
        hosts.start(hosts.Launch("flags", f"127.0.0.1:{port}", num_processes, process_id))
    import numpy as np

    from jkd.data import augment
    from jkd.models import create_model
    from jkd.train import (
        AdamWConfig,
        create_train_state,
        freeze_model,
        make_optimizer,
        objectives,
        parallel,
        train_step,
    )

    shape = (28, 28, 1)
    tg, teacher = freeze_model(create_model("mlp_2x1200", num_classes=10, input_shape=shape, seed=100))
    tx = make_optimizer(AdamWConfig(), steps_per_epoch=100, total_steps=10_000)
    g, state = create_train_state(create_model("mlp_100", num_classes=10, input_shape=shape, seed=0), tx, seed=0)
    view = functools.partial(augment.augment, mean=(0.5,), std=(0.25,), crop_padding=2)
    run = parallel.on_mesh(
        functools.partial(train_step, graphdef=g, tx=tx, view_fn=view, teacher_graphdef=tg), parallel.data_mesh()
    )
    teacher = run.place_frozen(teacher)
    rng = np.random.default_rng(0)
    share = slice(process_id * BATCH // num_processes, (process_id + 1) * BATCH // num_processes)
    batch = {
        "image": rng.integers(0, 256, (BATCH, *shape), dtype=np.uint8)[share],
        "label": rng.integers(0, 10, BATCH).astype(np.int32)[share],
    }
    obj = objectives.SoftKD()

    def steps(n):
        nonlocal state
        for _ in range(n):
            state, m = run(state, batch, obj, teacher)
        jax.block_until_ready(m["loss"])

    steps(3)  # compile
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        steps(STEPS)
        times.append((time.perf_counter() - t0) / STEPS)
    if process_id == 0:
        print(json.dumps({"ms_per_step": 1000 * statistics.median(times)}), flush=True)
    hosts.finish()


def _launch(num_processes: int) -> float:
    port = portpicker.pick_unused_port()
    cmd = [sys.executable, __file__, "--worker"]
    procs = [
        subprocess.Popen(
            cmd + [str(i), str(num_processes), str(port)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for i in range(num_processes)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"worker failed ({p.returncode}): {out[-2000:]}")
    line = [ln for ln in outs[0].splitlines() if ln.startswith("{")][-1]
    return json.loads(line)["ms_per_step"]


def run(repeats: int = 3) -> dict:
    one, two = [], []
    for _ in range(repeats):
        one.append(_launch(1))
        two.append(_launch(2))
    ms1, ms2 = statistics.median(one), statistics.median(two)
    return {
        "step": "mlp_2x1200 -> mlp_100, soft KD, global batch 256",
        "ms_per_step": {"1x4": ms1, "2x2": ms2},
        "runs_ms": {"1x4": one, "2x2": two},
        "ratio": ms1 / ms2,
    }


def report(r: dict) -> str:
    return (
        f"multihost: 2 processes x 2 devices {r['ms_per_step']['2x2']:.1f} ms/step vs 1 process x 4 devices "
        f"{r['ms_per_step']['1x4']:.1f} ms/step (ratio {r['ratio']:.2f})"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        from common import write

        r = run()
        write("multihost", r)
        print(report(r))
