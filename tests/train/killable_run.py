"""A small distillation run used by the kill/resume tests: `python -m tests.train.killable_run
CKPT_DIR OUT_NPZ [SLEEP_S]`. It resumes from CKPT_DIR when checkpoints exist."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

from jkd.data import pipeline as P  # noqa: E402
from jkd.train import objectives, parallel  # noqa: E402
from jkd.train.checkpoint import Checkpoints  # noqa: E402
from jkd.train.loop import LoopConfig, fit  # noqa: E402
from tests.train import helpers as H  # noqa: E402

NUM_STEPS = 40


def dataset():
    bs = H.batches(10, batch_size=16, seed=7)
    return P.InMemory(np.concatenate([b["image"] for b in bs]), np.concatenate([b["label"] for b in bs]))


def main(ckpt_dir, out, sleep_s=0.0):
    data = dataset()
    tg, teacher = H.teacher()
    g, state = H.student()
    run = parallel.single_device(H.step_fn(g, tg, view_fn=H.CROP_FLIP))

    def batches(start):
        for b in P.train_batches(data, batch_size=16, seed=3, start_step=start):
            time.sleep(sleep_s)
            yield b

    def log(record):  # the test reads where each run resumed from
        if record["event"] == "resumed":
            print(f"resumed {record['step']}", flush=True)

    ckpts = Checkpoints(ckpt_dir)
    state, _ = fit(
        run,
        state,
        objectives.SoftKD(),
        teacher,
        batches=batches,
        checkpoints=ckpts,
        log=log,
        config=LoopConfig(num_steps=NUM_STEPS, save_every=4, sync_every=2, progress=False),
    )
    ckpts.close()
    np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(state.params)])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
