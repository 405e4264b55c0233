"""The prepared accelerator check (`make gpu-check`) runs, here on the CPU at its --tiny size: a
device is lent rarely and briefly, so the script must not be the thing that fails there."""

import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_gpu_check_runs_at_tiny_size_with_both_kernels(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import lm_gpu_check

    # as the script runs on a device: JAX's default promotion
    with jax.numpy_dtype_promotion("standard"):
        r = lm_gpu_check.main(tiny=True, peak_tflops=989.0)
    assert math.isfinite(r["loss"]) and r["step_s"] > 0 and r["sampler_tokens_per_s"] > 0
    assert "implementation='xla'" in r["attention"]  # the fused call, JAX's XLA implementation on the CPU
    assert "blocked_attention_error" not in r, r.get("blocked_attention_error")
    assert r["step_s_blocked_attention"] > 0  # the kernel compared ran
    assert r["plan_peak_bytes"] > 0  # the memory plan (the CPU reports no measured peak)
    # the model FLOPs count the output projection only for the tokens the loss counts
    t, s = lm_gpu_check.TINY["teacher"], lm_gpu_check.TINY["student"]
    counted = 4 * (128 - 128 // 8)  # next-token positions 16..127 of each row
    full = lm_gpu_check._model_flops(t, 4, 128, 4 * 128, 2)
    np.testing.assert_allclose(
        full - lm_gpu_check._model_flops(t, 4, 128, counted, 2), 2 * t.vocab_size * t.hidden_size * (4 * 128 - counted)
    )

    def written_out(c, factor):  # per token: q, k, v, o, the SwiGLU's three, the norms; causal attention
        layer = (
            c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
            + 3 * c.hidden_size * c.intermediate_size
            + 2 * c.hidden_size
            + 2 * 128 * c.num_heads * c.head_dim
        )
        return factor * (4 * 128 * c.num_layers * layer + counted * c.vocab_size * c.hidden_size)

    assert r["model_tflops_per_step"] * 1e12 == pytest.approx(written_out(t, 2) + written_out(s, 6))
    # the full size is the issue's: Qwen2.5-1.5B and -0.5B shapes, 8 x 2,048 tokens
    full_t, full_s = lm_gpu_check.FULL["teacher"], lm_gpu_check.FULL["student"]
    assert 1.5e9 < full_t.num_parameters() < 1.6e9 and 4.9e8 < full_s.num_parameters() < 5.0e8
    assert (lm_gpu_check.FULL["batch"], lm_gpu_check.FULL["tokens"]) == (8, 2048)
    sys.modules.pop("lm_gpu_check", None)
