"""Quantization-aware distillation and post-training quantization in the job, through the edge
experiment at a tiny size: the trained-for-it student is measured (and saved) as its GGUF file holds
it, the float student also quantized after training, each a row of the report; GGUF files of the
float and QAT students are written."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import jkd.jobs.lm as LX
from jkd.compress.gguf_blocks import fake_quantize
from jkd.train.lm_steps import TokenKD

pytestmark = pytest.mark.slow


def tiny(**kw) -> LX.LMExperimentConfig:
    cfg = LX.demo_config()
    settings = dict(
        data_sizes=(("train", 48), ("validation", 4), ("test", 4), ("unlabelled", 4)),
        vocab_size=400,
        teacher_steps=2,
        student_steps=3,
        labelled_subset=None,
        batch_size=4,
        pack_length=None,
        seeds=(0,),
        max_new_tokens=8,
        max_length=160,
        include_baseline=False,
        pass_k=0,
        teacher=dataclasses.replace(cfg.teacher, hidden_size=32, head_dim=8, intermediate_size=64, num_layers=2),
        students=(LX.LMStudent("s", teacher_layers=(1,)),),
        distillations=(
            LX.LMDistillation("kd", TokenKD(kd_weight=1.0, ce_weight=0.0)),
            LX.LMDistillation("kd qat", TokenKD(kd_weight=1.0, ce_weight=0.0), quantize="q4_0"),
        ),
        ptq="q4_0",
    )
    return dataclasses.replace(cfg, **{**settings, **kw})


def _params(folder):
    from flax import nnx

    from jkd.models.hf import load_hf

    return nnx.state(load_hf(folder), nnx.Param)


def test_qat_and_ptq_rows_and_the_edge_experiment(tmp_path):
    from jkd import cli

    module = cli.load_config_file("experiments/edge_gguf/config.py")
    cfg = module.get_config()
    assert cfg.ptq == "q4_0" and [d.quantize for d in cfg.distillations] == [None, "q4_0"]
    kd = (
        LX.LMDistillation("kd", TokenKD(kd_weight=1.0, ce_weight=0.0)),
        LX.LMDistillation("kd qat", TokenKD(kd_weight=1.0, ce_weight=0.0), quantize="q4_0"),
    )
    module.main(tiny(distillations=kd), str(tmp_path), progress=False)
    summary = __import__("json").loads((tmp_path / "summary.json").read_text())
    rows = {e["name"]: e for e in summary["models"]}
    assert {"s kd", "s kd · q4_0", "s kd qat"} <= set(rows) and "quantization" not in rows["s kd"]
    assert rows["s kd · q4_0"]["quantization"] == "q4_0, after training"
    assert rows["s kd qat"]["quantization"] == "q4_0, trained for it" and "s kd qat · q4_0" not in rows
    notes = " ".join(summary["notes"])
    assert "s kd · q4_0 (q4_0, after training) against s kd in float32: task success" in notes
    assert "s kd qat (q4_0, trained for it) against s kd in float32" in notes
    # the measured (and saved) weights are those of the file: quantizing them again changes nothing
    float_w, ptq_w, qat_w = (_params(tmp_path / slug / "seed0") for slug in ("s_kd", "s_kd___q4_0", "s_kd_qat"))
    again = jax.jit(lambda p: fake_quantize(p, "q4_0"))
    for a, b in zip(jax.tree.leaves(again(ptq_w)), jax.tree.leaves(ptq_w)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(again(qat_w)), jax.tree.leaves(qat_w)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(again(float_w)), jax.tree.leaves(ptq_w)):  # the PTQ row: the float one, quantized
        np.testing.assert_array_equal(a, b)
    assert any(
        np.abs(np.asarray(a) - np.asarray(b)).max() > 0
        for a, b in zip(jax.tree.leaves(float_w), jax.tree.leaves(ptq_w))
    )
    # the QAT student trained differently from the float one (its passes saw other weights)
    assert any(
        np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
        for a, b in zip(jax.tree.leaves(again(float_w)), jax.tree.leaves(qat_w))
    )
    # the GGUF files: the float student at three types, the QAT one at its own; none for the PTQ row
    table = (tmp_path / "gguf.md").read_text()
    for name, quant in (("s_kd", "f16"), ("s_kd", "q8_0"), ("s_kd", "q4_0"), ("s_kd_qat", "q4_0")):
        assert f"gguf/{name}.{quant}.gguf" in table and (tmp_path / "gguf" / f"{name}.{quant}.gguf").is_file()
    assert "s_kd___q4_0" not in table


def test_bad_quantization_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"ptq \(--ptq\) must be q8_0 or q4_0"):
        LX.run(tiny(ptq="q5_k"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="kd qat: quantize must be q8_0 or q4_0"):
        LX.run(
            tiny(ptq=None, distillations=(LX.LMDistillation("kd qat", TokenKD(), quantize="int4"),)),
            tmp_path,
            progress=False,
        )
