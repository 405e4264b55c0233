"""`jkd lm distill` as 2 processes x 2 CPU devices is one run: the students of the 1-process run
on 4 devices (within 1e-5), the same answers generated (each process answers half the test turns),
one report written by process 0; a killed process stops the other with exit code 3 within 60 s,
and `--resume` on both completes from their last checkpoint."""

from __future__ import annotations

import json

import numpy as np
import portpicker
import pytest

from jkd import cli
from tests.test_lm_stored_mode import distill_argv, pair  # noqa: F401 - pair: a teacher folder and conversations
from tests.test_multihost import _finish, _start, kill_after_checkpoint

pytestmark = pytest.mark.slow


def _argv(root, files, run_dir, *extra):
    return distill_argv(
        root,
        files,
        run_dir,
        "--mode",
        "token",
        "--kd-weight",
        "0.8",
        "--ce-weight",
        "0.2",
        "--student",
        "16x1",
        "--steps",
        "8",
        "--seeds",
        "0,1",
        "--no-baseline",
        "--set",
        "student_optimizer.eps=1e-4",
        *extra,
    )


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def test_lm_distill_over_two_processes_survives_a_lost_peer(pair, tmp_path):  # noqa: F811
    root, files = pair
    ref, two = tmp_path / "ref", tmp_path / "two"
    assert cli.main(_argv(root, files, ref, "--devices", "4")) == 0

    argv = _argv(root, files, two, "--peer-timeout", "5")
    # a checkpoint every 2 of the 8 steps: process 1 is killed after the first
    kill_after_checkpoint(argv, two / "student_16x1_token_fkl" / "ckpt" / "2", tmp_path)
    assert not (two / "summary.json").exists()

    outs = _finish(_start(argv + ["--resume"], portpicker.pick_unused_port(), tmp_path, "resumed"), tmp_path, "resumed")
    assert "process 0 of 2 (flags); 2 local of 4 devices" in outs[0]
    assert "| student 16x1 token fkl |" in outs[0] and "| student 16x1 token fkl |" not in outs[1]
    assert "resumed from the checkpoint of step" in outs[0]
    for seed in (0, 1):
        a = _weights(ref / "student_16x1_token_fkl" / f"seed{seed}")
        b = _weights(two / "student_16x1_token_fkl" / f"seed{seed}")
        assert max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a) < 1e-5
    want = json.loads((ref / "summary.json").read_text())["models"]
    got = json.loads((two / "summary.json").read_text())["models"]
    for m, n in zip(want, got):  # the generation split over the processes, gathered: the same answers
        assert m["name"] == n["name"]
        assert n["test_cross_entropy_mean"] == pytest.approx(m["test_cross_entropy_mean"], abs=1e-5)
        for a, b in zip(m["per_seed"], n["per_seed"]):
            assert {k: v for k, v in a.items() if k not in ("generation_tokens_per_s", "test_cross_entropy")} == {
                k: v for k, v in b.items() if k not in ("generation_tokens_per_s", "test_cross_entropy")
            }
    assert (two / "samples.md").read_text() == (ref / "samples.md").read_text()
