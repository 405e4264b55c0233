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
def test_gpu_check_runs_at_tiny_size_with_its_what_if(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import lm_gpu_check
    from jkd.models import decoder

    # as the script runs on a device: JAX's default promotion (the suite's strict mode trips inside
    # jax.nn.dot_product_attention's own XLA path for bfloat16)
    with jax.numpy_dtype_promotion("standard"):
        r = lm_gpu_check.main(tiny=True, peak_tflops=989.0)
    assert decoder.attend_causal is lm_gpu_check._BLOCKED  # the what-if's patch is undone
    assert math.isfinite(r["loss"]) and r["step_s"] > 0 and r["sampler_tokens_per_s"] > 0
    assert "xla_attention_error" not in r, r.get("xla_attention_error")
    assert r["step_s_xla_attention"] > 0  # the what-if ran (XLA's attention on the CPU)
    # the model FLOPs count the output projection only for the tokens the loss counts
    t, s = lm_gpu_check.TINY["teacher"], lm_gpu_check.TINY["student"]
    counted = 4 * (128 - 128 // 8)  # next-token positions 16..127 of each row
    full = lm_gpu_check._model_flops(t, 4, 128, 4 * 128, 2)
    np.testing.assert_allclose(full - lm_gpu_check._model_flops(t, 4, 128, counted, 2),
                               2 * t.vocab_size * t.hidden_size * (4 * 128 - counted))
    def written_out(c, factor):  # per token: q, k, v, o, the SwiGLU's three, the norms; causal attention
        layer = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * \
            c.intermediate_size + 2 * c.hidden_size + 2 * 128 * c.num_heads * c.head_dim
        return factor * (4 * 128 * c.num_layers * layer + counted * c.vocab_size * c.hidden_size)

    assert r["model_tflops_per_step"] * 1e12 == pytest.approx(written_out(t, 2) + written_out(s, 6))
    sys.modules.pop("lm_gpu_check", None)
