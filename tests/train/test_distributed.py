"""Two processes on localhost (jax.distributed, gloo) train to identical parameters."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker
import pytest

from tests.train.distributed_run import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_processes_train_identically(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.train.distributed_run"]
    port = str(portpicker.pick_unused_port())
    procs = [
        subprocess.Popen(
            cmd + [str(i), "2", port, str(tmp_path / f"p{i}.npz")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    ref = train(0, 1)  # one process, 4 devices (this one), while the two run
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    p0, p1 = (np.load(tmp_path / f) for f in ("p0.npz", "p1.npz"))
    assert len(p0.files) == len(ref)
    for k, want in zip(p0.files, ref):
        np.testing.assert_array_equal(p0[k], p1[k])  # each process fed only its half
        np.testing.assert_allclose(p0[k], want, atol=1e-5)  # = one process, 4 devices
