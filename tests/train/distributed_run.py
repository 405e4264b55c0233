"""One process of a 2-process data-parallel run on localhost: `python -m
tests.train.distributed_run PROCESS_ID NUM_PROCESSES PORT OUT_NPZ`. With NUM_PROCESSES=1 it
runs the same global batches on one process with 4 devices (the reference)."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_num_cpu_devices", 4 // nproc)
jax.config.update("jax_numpy_dtype_promotion", "strict")
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

from jkd.data import pipeline as P  # noqa: E402
from jkd.train import objectives, parallel  # noqa: E402
from tests.train import helpers as H  # noqa: E402
from tests.train.killable_run import dataset  # noqa: E402

assert jax.device_count() == 4 and jax.process_count() == nproc
mesh = parallel.data_mesh()
tg, teacher = H.teacher()
g, state = H.student()
run = parallel.on_mesh(H.step_fn(g, tg, view_fn=H.CROP_FLIP), mesh)
stream = P.train_batches(dataset(), batch_size=16, seed=3, process_index=pid, process_count=nproc)
for _ in range(6):
    state, metrics = run(state, next(stream), objectives.SoftKD(), teacher)
leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
np.savez(out, *leaves, loss=np.asarray(metrics["loss"].addressable_data(0)))
if nproc > 1:
    jax.distributed.shutdown()
