"""`jkd lm distill` and memory: the plan printed before training, a plan over the limit refused
before the run folder is written, mixed precision (bfloat16 passes, float32 master weights), a
bfloat16 teacher, and the attention kernel named in the log."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jkd import cli
from tests.test_lm_stored_mode import distill_argv, pair  # noqa: F401 - the fixture


def _tiny(root, files, run_dir, *flags):
    return distill_argv(
        root,
        files,
        run_dir,
        "--student",
        "layers=0",
        "--steps",
        "2",
        "--seeds",
        "0",
        "--no-baseline",
        "--set",
        "student_optimizer.eps=1e-4",
        *flags,
    )


def test_a_plan_over_the_memory_limit_is_refused_before_the_run_folder_is_written(pair, tmp_path, capsys):  # noqa: F811
    root, files = pair
    run = tmp_path / "run"
    assert cli.main(_tiny(root, files, run, "--memory-limit-gib", "0.0001")) == 2
    captured = capsys.readouterr()
    assert (
        "memory plan per device (XLA's compiled memory analysis), against 105 KiB per device (--memory-limit-gib)"
        in captured.out
    )
    assert "student layers 0 token fkl" in captured.out
    err = captured.err
    assert "the step 'student layers 0 token fkl' needs" in err and "Nothing was written" in err
    assert "--remat" in err and "--teacher-dtype bfloat16" in err and "--dtype bfloat16" in err
    assert not run.exists()


@pytest.mark.slow
def test_bfloat16_passes_with_float32_master_weights_and_a_bfloat16_teacher(pair, tmp_path, capsys):  # noqa: F811
    from safetensors.numpy import load_file

    root, files = pair
    plans = {}
    # JAX's own XLA attention fails to lower its bfloat16 gradient under the suite's strict dtype
    # promotion (inside JAX): the fused call is named by the float32 run
    for name, flags in (
        ("f32", ("--attention", "xla")),
        ("bf16", ("--dtype", "bfloat16", "--teacher-dtype", "bfloat16")),
    ):
        assert cli.main(_tiny(root, files, tmp_path / name, *flags)) == 0
        out = capsys.readouterr().out
        assert (
            "attention: jkd's blocked XLA attention\n"
            if name == "bf16"
            else "attention: JAX's fused XLA attention (jax.nn.dot_product_attention, implementation='xla')\n"
        ) in out
        row = next(line for line in out.splitlines() if line.strip().startswith("student layers 0 token fkl "))
        plans[name] = row.split()
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["dtype"] == (None if name == "f32" else "bfloat16")
        weights = load_file(str(tmp_path / name / "student_layers_0_token_fkl" / "seed0" / "model.safetensors"))
        assert {w.dtype for w in weights.values()} == {np.dtype(np.float32)}  # the master weights are saved
    # the teacher column of the plan: half the bytes in bfloat16
    assert plans["f32"][6] == plans["bf16"][6] == "KiB"
    t32, t16 = (float(plans[k][5].replace(",", "")) for k in ("f32", "bf16"))
    assert t16 == pytest.approx(t32 / 2, abs=1)
