"""The prepared accelerator check for language-model distillation (run where a GPU is lent).

Runs with what the GPU image holds (JAX with CUDA, flax, optax, orbax; the project's own files;
grain's wheel carried, see BUILD_NOTES) and reports:

1. The token-KD step's model FLOPs utilisation in bfloat16: a random Llama teacher of ~0.9B
   parameters and a student of ~125M, batch 16 x 1024 tokens, forward KL + cross-entropy (fused),
   AdamW. Model FLOPs = 2 (teacher) + 6 (student) x the matrix-product parameters per token: the
   layers' for every token (with causal attention's ``2 T d`` per layer), the output projection's
   only for the tokens the loss counts (an embedding lookup is no product), over the measured step
   time and the chip's peak bf16 rate (``--peak-tflops``, default 989 for an H100/H200 SXM).
   Target: >= 40%.
2. The sampler's tokens per second for the student: 64 prompts of 128 tokens, 256 new tokens.
3. A what-if for the next step: the same step with ``jax.nn.dot_product_attention`` forced to
   cuDNN's fused kernel in place of jkd's blocked attention (``step_s_cudnn_attention``,
   ``mfu_cudnn_attention``, or ``cudnn_attention_error`` saying why it could not run).

``--tiny`` shrinks everything to check the script itself on a CPU.

    python benchmarks/lm_gpu_check.py [--tiny] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jkd.models import decoder
from jkd.models.decoder import Decoder
from jkd.models.decoder_config import DecoderConfig
from jkd.train import optim, parallel
from jkd.train.lm_steps import TokenKD, learned_positions, token_kd_step
from jkd.models.sampler import SamplingConfig, generate
from jkd.train.state import create_train_state, freeze_model

FULL = {
    "teacher": DecoderConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16,
                             num_heads=16, num_kv_heads=8, max_position_embeddings=4096),
    "student": DecoderConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                             num_heads=12, num_kv_heads=4, max_position_embeddings=4096),
    "batch": 16, "tokens": 1024, "sample_batch": 64, "prompt": 128, "new": 256,
}
TINY = {
    "teacher": DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, max_position_embeddings=512),
    "student": DecoderConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                             num_kv_heads=1, max_position_embeddings=512),
    "batch": 4, "tokens": 128, "sample_batch": 4, "prompt": 16, "new": 16,
}


def _model_flops(cfg: DecoderConfig, rows: int, tokens: int, counted: int, factor: int) -> float:
    """``factor`` x the products of ``rows`` sequences of ``tokens``: the layers' parameters and
    causal attention (``QK^T`` and ``PV``, half the square) for every token, the output projection
    for the ``counted`` tokens only; not the embedding lookup (the layers' norm scales, ``2 d``
    each, ride along: negligible)."""
    vd = cfg.vocab_size * cfg.hidden_size
    layers = cfg.num_parameters() - vd * (1 if cfg.tie_embeddings else 2) - cfg.hidden_size
    attention = 2 * tokens * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return factor * (rows * tokens * (layers + attention) + counted * vd)


_BLOCKED = decoder.attend_causal


def _fused_attention(q, k, v, mask, *, block, implementation):
    """``jax.nn.dot_product_attention`` (grouped heads, ``is_causal``) in the decoder's
    ``attend_causal`` signature. It ignores ``mask``: right only for whole causal sequences with no
    padding or packing, as this check's batch is."""
    del mask, block
    return jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), is_causal=True,
                                        implementation=implementation)


def _timed_steps(state, batch, kd, frozen, g, tg, tx, steps):
    """One step (compilation), then ``steps`` timed: ``(state, metrics, seconds per step)``."""
    run = parallel.single_device(functools.partial(token_kd_step, graphdef=g, teacher_graphdef=tg, tx=tx))
    state, m = run(state, batch, kd, frozen)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = run(state, batch, kd, frozen)
    jax.block_until_ready(m["loss"])
    return state, m, (time.perf_counter() - t0) / steps


def main(tiny: bool, peak_tflops: float) -> dict:
    s = TINY if tiny else FULL
    tcfg, scfg, b, t = s["teacher"], s["student"], s["batch"], s["tokens"]
    t0 = time.perf_counter()
    teacher = Decoder(tcfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    student = Decoder(scfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    tg, frozen = freeze_model(teacher)
    tx = optim._strict_safe(optax.adamw(1e-4, weight_decay=0.01))
    g, state = create_train_state(student, tx, seed=0)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, scfg.vocab_size, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), bool).at[:, : t // 8].set(False)
    batch = {"tokens": tokens, "loss_mask": mask}
    kd = TokenKD(kd_weight=0.5, ce_weight=0.5, chunk_size=2048)
    steps = 3 if tiny else 10
    state, m, step_s = _timed_steps(state, batch, kd, frozen, g, tg, tx, steps)
    compile_s = time.perf_counter() - t0 - steps * step_s
    counted = int(learned_positions(batch).sum())
    flops = _model_flops(tcfg, b, t, counted, 2) + _model_flops(scfg, b, t, counted, 6)
    achieved = flops / step_s / 1e12
    out = {"device": jax.devices()[0].device_kind, "teacher_parameters": tcfg.num_parameters(),
           "student_parameters": scfg.num_parameters(), "batch": b, "tokens": t, "step_s": step_s,
           "first_step_s": compile_s, "model_tflops_per_step": flops / 1e12, "achieved_tflops": achieved,
           "peak_tflops": peak_tflops, "mfu": achieved / peak_tflops, "target_mfu": 0.4,
           "loss": float(m["loss"])}
    # What-if, for the next step towards the target: cuDNN's fused attention in place of jkd's
    # blocked attention (XLA's on the CPU, to check this path itself with --tiny).
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    try:
        decoder.attend_causal = functools.partial(_fused_attention, implementation=impl)
        state, _, fused_s = _timed_steps(state, batch, kd, frozen, g, tg, tx, steps)
        out.update({f"step_s_{impl}_attention": fused_s, f"mfu_{impl}_attention": flops / fused_s / 1e12 / peak_tflops})
    except Exception as e:  # noqa: BLE001  (a what-if: report why it could not run, keep the rest)
        out[f"{impl}_attention_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        decoder.attend_causal = _BLOCKED
    student = nnx.merge(g, state.params, state.batch_stats, state.rest)
    prompts = rng.integers(0, scfg.vocab_size, (s["sample_batch"], s["prompt"])).tolist()
    gen = functools.partial(generate, student, prompts, max_new_tokens=s["new"], stop_tokens=[],
                            sampling=SamplingConfig(temperature=1.0))
    gen(key=0)
    t0 = time.perf_counter()
    gen(key=1)
    gen_s = time.perf_counter() - t0
    out["sampler_tokens_per_s"] = s["sample_batch"] * s["new"] / gen_s
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    a = p.parse_args()
    r = main(a.tiny, a.peak_tflops)
    print(json.dumps(r, indent=2))
    print(f"lm_gpu_check on {r['device']}: token-KD step {r['step_s'] * 1e3:.1f} ms, {r['achieved_tflops']:.1f} TFLOP/s "
          f"= {100 * r['mfu']:.1f}% MFU (target >= 40%); sampler {r['sampler_tokens_per_s']:.0f} tok/s")
    for impl in ("cudnn", "xla"):
        if f"mfu_{impl}_attention" in r:
            print(f"  what-if, {impl} fused attention: {r[f'step_s_{impl}_attention'] * 1e3:.1f} ms a step, "
                  f"{100 * r[f'mfu_{impl}_attention']:.1f}% MFU")
        elif f"{impl}_attention_error" in r:
            print(f"  what-if, {impl} fused attention: could not run: {r[f'{impl}_attention_error']}")
