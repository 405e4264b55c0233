"""One process of a 2-process data-parallel run on localhost: `python -m
tests.train.distributed_run PROCESS_ID NUM_PROCESSES PORT OUT_NPZ`. The reference (one process
with 4 devices, the same global batches) is :func:`train` called in the test's own process."""

import os
import sys

import numpy as np


def train(pid: int, nproc: int) -> list[np.ndarray]:
    """6 data-parallel steps over the 4 devices of ``nproc`` processes; this process's copy of the
    parameters, then the last loss."""
    import jax

    from jkd.data import pipeline as P
    from jkd.train import objectives, parallel
    from tests.train import helpers as H
    from tests.train.killable_run import dataset

    assert jax.device_count() == 4 and jax.process_count() == nproc
    mesh = parallel.data_mesh()
    tg, teacher = H.teacher()
    g, state = H.student()
    run = parallel.on_mesh(H.step_fn(g, tg, view_fn=H.CROP_FLIP), mesh)
    stream = P.train_batches(dataset(), batch_size=16, seed=3, process_index=pid, process_count=nproc)
    for _ in range(6):
        state, metrics = run(state, next(stream), objectives.SoftKD(), teacher)
    return [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)] + [
        np.asarray(metrics["loss"].addressable_data(0))
    ]


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.config.update("jax_num_cpu_devices", 4 // nproc)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    np.savez(out, *train(pid, nproc))
    jax.distributed.shutdown()
