"""The issue's acceptance targets on the embedded default, end to end: a distilled student
pruned to 80% loses under 1 point of test accuracy, an int8 student under 0.5 point."""

import dataclasses

import pytest

from jkd import experiment as X
from jkd.compress.job import CompressConfig, run_compress


@pytest.mark.slow
def test_pruned_and_int8_students_keep_their_accuracy_on_the_embedded_default(tmp_path):
    cfg = dataclasses.replace(X.demo_config(), seeds=(0,), include_baseline=False, distillations=X.demo_config().distillations[:1],
                              teacher_epochs=10, student_epochs=20, eval_every_epochs=20)
    X.run(cfg, tmp_path / "run", progress=False, echo=lambda m: None)
    summary = run_compress(tmp_path / "run" / "soft_kd_t_8" / "seed0", tmp_path / "c",
                           config=CompressConfig(formats=("stablehlo",)), progress=False, echo=lambda m: None)
    rows = {m["name"]: m for m in summary["models"]}
    student = rows["student"]["test_accuracy"]
    assert student > 0.93  # a real student, not an untrained one
    assert summary["pruning"]["prunable_sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert rows["pruned 80%"]["test_accuracy"] > student - 0.01
    for name in ("PTQ int8 weights", "PTQ int8 weights+activations (static)", "QAT int8 weights"):
        assert rows[name]["test_accuracy"] > student - 0.005, name
        assert rows[name]["int8_fraction"] > 0.95
