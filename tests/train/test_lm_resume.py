"""Language-model distillation killed with SIGKILL and resumed ends with the uninterrupted run's
parameters; each test asserts that the rerun resumed (cached answers, a checkpoint's step)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("lm_pipeline_script.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _run(mode, run_dir):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(run_dir)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _kill_after(mode, run_dir, pattern):
    """Start the run, SIGKILL it as soon as a line matches ``pattern``; returns what it printed."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), mode, str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-2000:]
    return "".join(seen)


def _params(run_dir):
    with np.load(run_dir / "final.npz") as z:
        return [z[k] for k in sorted(z.files, key=lambda s: int(s.split("_")[1]))]


def _assert_same(a, b):
    for x, y in zip(_params(a), _params(b)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = {}
    for mode in ("sequence", "on_policy"):
        d = tmp_path_factory.mktemp(mode)
        _run(mode, d)
        out[mode] = d
    return out


@pytest.mark.slow
def test_sequence_kd_killed_during_generation_resumes_from_the_cached_answers(uninterrupted, tmp_path):
    _kill_after("sequence", tmp_path, r"teacher answers: batch 2/6")
    assert not (tmp_path / "final.npz").exists()
    log = _run("sequence", tmp_path)
    cached = int(re.search(r"batch 6/6 \((\d+) from the cache", log).group(1))
    assert 2 <= cached < 6, log  # resumed generation, did not start over nor skip it
    _assert_same(tmp_path, uninterrupted["sequence"])


@pytest.mark.slow
def test_sequence_kd_killed_during_training_resumes_from_its_checkpoint(uninterrupted, tmp_path):
    _kill_after("sequence", tmp_path, r"^step 5$")
    log = _run("sequence", tmp_path)
    assert "batch 6/6 (6 from the cache" in log
    resumed = int(re.search(r"resumed from step (\d+)", log).group(1))
    assert resumed == 4, log  # the script saves synchronously every 2 steps
    _assert_same(tmp_path, uninterrupted["sequence"])


@pytest.mark.slow
def test_on_policy_killed_mid_training_resumes_with_the_same_samples(uninterrupted, tmp_path):
    _kill_after("on_policy", tmp_path, r"^step 5$")
    log = _run("on_policy", tmp_path)
    resumed = int(re.search(r"resumed from step (\d+)", log).group(1))
    assert resumed == 4, log
    _assert_same(tmp_path, uninterrupted["on_policy"])
