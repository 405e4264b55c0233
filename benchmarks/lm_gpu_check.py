"""The prepared accelerator check for language-model distillation (run where a GPU is lent).

Runs with what the GPU image holds (JAX with CUDA, flax, optax, orbax; the project's own files;
grain's wheel carried: the device has no network) and reports:

1. The token-KD step's model FLOPs utilisation at real shapes, as ``jkd lm distill --dtype bfloat16
   --teacher-dtype bfloat16`` runs it: a Qwen2.5-1.5B-shaped teacher in bfloat16 and a
   Qwen2.5-0.5B-shaped student (float32 master weights, its passes in bfloat16), random weights,
   vocabulary 151,936, batch 8 x 2,048 tokens, forward KL + cross-entropy (fused), AdamW, with
   cuDNN's flash attention (``jkd.models.attention.FusedAttention("cudnn")``). Model FLOPs = 2
   (teacher) + 6 (student) x the matrix-product parameters per token: the layers' for every token
   (with causal attention's ``2 T d`` per layer), the output projection's only for the tokens the
   loss counts (an embedding lookup is no product), over the measured step time and the chip's
   peak bf16 rate (``--peak-tflops``, default 989 for an H100/H200 SXM). Target: >= 40%.
2. With ``--compare-blocked`` (and always with ``--tiny``): the same step with jkd's blocked XLA
   attention, the kernel compared (at 2,048 tokens its 32 query blocks per layer make a long
   compilation: off by default to keep the check within a lent device's minutes).
3. The memory plan of the step (XLA's compiled memory analysis, :mod:`jkd.train.memory_plan`)
   against the device's measured peak (``memory_stats()["peak_bytes_in_use"]``) where the backend
   reports it.
4. The sampler's tokens per second for the student: 64 prompts of 128 tokens, 256 new tokens.

``--tiny`` shrinks everything to check the script itself on a CPU (JAX's XLA implementation of
the fused call stands in for cuDNN's there).

    python benchmarks/lm_gpu_check.py [--tiny] [--peak-tflops 989] [--compare-blocked]
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

from jkd.models.attention import BlockedAttention, FusedAttention
from jkd.models.decoder import Decoder, set_attention
from jkd.models.decoder_config import DecoderConfig
from jkd.train import memory_plan as MP
from jkd.train import optim, parallel
from jkd.train.lm_steps import TokenKD, learned_positions, token_kd_step
from jkd.models.sampler import SamplingConfig, generate
from jkd.train.state import create_train_state, freeze_model

FULL = {  # the shapes of Qwen2.5-1.5B and Qwen2.5-0.5B (config.json of each)
    "teacher": DecoderConfig(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        family="qwen2",
        tie_embeddings=True,
        max_position_embeddings=4096,
    ),
    "student": DecoderConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        family="qwen2",
        tie_embeddings=True,
        max_position_embeddings=4096,
    ),
    "batch": 8,
    "tokens": 2048,
    "chunk": 2048,
    "sample_batch": 64,
    "prompt": 128,
    "new": 256,
}
TINY = {
    "teacher": DecoderConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
    ),
    "student": DecoderConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=512,
    ),
    "batch": 4,
    "tokens": 128,
    "chunk": 256,
    "sample_batch": 4,
    "prompt": 16,
    "new": 16,
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


def _step(s: dict, kernel, *, steps: int) -> dict:
    """Build the pair with ``kernel``, plan the step, run one (compilation) and time ``steps``."""
    tcfg, scfg, b, t = s["teacher"], s["student"], s["batch"], s["tokens"]
    teacher = set_attention(Decoder(tcfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), kernel)
    student = set_attention(Decoder(scfg, dtype=jnp.float32, rngs=nnx.Rngs(1)), kernel)
    tg, frozen = freeze_model(teacher)
    del teacher
    tx = optim._strict_safe(optax.adamw(1e-4, weight_decay=0.01))
    g, state = create_train_state(student, tx, seed=0)
    del student
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, scfg.vocab_size, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), bool).at[:, : t // 8].set(False)
    batch = {"tokens": tokens, "loss_mask": mask}
    kd = TokenKD(kd_weight=0.5, ce_weight=0.5, chunk_size=s["chunk"])
    run = parallel.single_device(
        functools.partial(token_kd_step, graphdef=g, teacher_graphdef=tg, tx=tx, compute_dtype=jnp.bfloat16)
    )
    weights = MP.per_device_bytes(state.params)
    t0 = time.perf_counter()
    plan = MP.compiled_step_memory(
        run.lower(state, batch, kd, frozen),
        name="token KD",
        teacher=MP.per_device_bytes(frozen),
        student=weights,
        optimizer=MP.per_device_bytes(state.opt_state),
        gradients=weights,
        loss_chunk=MP.fused_loss_chunk(b * (t - 1), s["chunk"], scfg.vocab_size, with_teacher=True),
    )
    state, m = run(state, batch, kd, frozen)
    jax.block_until_ready(m["loss"])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = run(state, batch, kd, frozen)
    jax.block_until_ready(m["loss"])
    out = {
        "step_s": (time.perf_counter() - t0) / steps,
        "first_step_s": first,
        "loss": float(m["loss"]),
        "counted": int(learned_positions(batch).sum()),
        "graphdef": g,
        "state": state,
        "plan_peak_bytes": None if plan is None else plan.peak,
    }
    stats = jax.local_devices()[0].memory_stats() or {}
    if plan is not None and stats.get("peak_bytes_in_use"):
        out["measured_peak_bytes"] = int(stats["peak_bytes_in_use"])
        out["plan_over_measured"] = plan.peak / stats["peak_bytes_in_use"]
    return out


def main(tiny: bool, peak_tflops: float, compare_blocked: bool = False) -> dict:
    s = TINY if tiny else FULL
    tcfg, scfg, b, t = s["teacher"], s["student"], s["batch"], s["tokens"]
    steps = 3 if tiny else 10
    fused = FusedAttention("cudnn" if jax.default_backend() == "gpu" else "xla")
    out = {
        "device": jax.devices()[0].device_kind,
        "teacher_parameters": tcfg.num_parameters(),
        "student_parameters": scfg.num_parameters(),
        "batch": b,
        "tokens": t,
        "attention": fused.description,
        "peak_tflops": peak_tflops,
        "target_mfu": 0.4,
    }
    main_run = _step(s, fused, steps=steps)  # first: the device's peak-memory counter starts here
    flops = _model_flops(tcfg, b, t, main_run["counted"], 2) + _model_flops(scfg, b, t, main_run["counted"], 6)
    out.update({k: v for k, v in main_run.items() if k not in ("graphdef", "state", "counted")})
    out.update(
        {
            "model_tflops_per_step": flops / 1e12,
            "achieved_tflops": flops / main_run["step_s"] / 1e12,
            "mfu": flops / main_run["step_s"] / 1e12 / peak_tflops,
        }
    )
    g, state = main_run.pop("graphdef"), main_run.pop("state")
    student = nnx.merge(g, state.params, state.batch_stats, state.rest)
    del state, main_run
    try:  # the kernel compared: jkd's blocked XLA attention
        if tiny or compare_blocked:
            blocked = _step(s, BlockedAttention(), steps=steps)
            out.update(
                {
                    "step_s_blocked_attention": blocked["step_s"],
                    "mfu_blocked_attention": flops / blocked["step_s"] / 1e12 / peak_tflops,
                }
            )
            del blocked
    except Exception as e:  # noqa: BLE001  (a comparison: report why it could not run, keep the rest)
        out["blocked_attention_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, scfg.vocab_size, (s["sample_batch"], s["prompt"])).tolist()
    gen = functools.partial(
        generate, student, prompts, max_new_tokens=s["new"], stop_tokens=[], sampling=SamplingConfig(temperature=1.0)
    )
    gen(key=0)
    t0 = time.perf_counter()
    gen(key=1)
    out["sampler_tokens_per_s"] = s["sample_batch"] * s["new"] / (time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--compare-blocked", action="store_true", help="also time jkd's blocked XLA attention")
    a = p.parse_args()
    r = main(a.tiny, a.peak_tflops, a.compare_blocked)
    print(json.dumps(r, indent=2))
    print(
        f"lm_gpu_check on {r['device']}: token-KD step {r['step_s'] * 1e3:.1f} ms with {r['attention']}, "
        f"{r['achieved_tflops']:.1f} TFLOP/s = {100 * r['mfu']:.1f}% MFU (target >= 40%); sampler "
        f"{r['sampler_tokens_per_s']:.0f} tok/s"
    )
    if "mfu_blocked_attention" in r:
        print(
            f"  with jkd's blocked XLA attention: {r['step_s_blocked_attention'] * 1e3:.1f} ms a step, "
            f"{100 * r['mfu_blocked_attention']:.1f}% MFU"
        )
    elif "blocked_attention_error" in r:
        print(f"  with jkd's blocked XLA attention: could not run: {r['blocked_attention_error']}")
    if "plan_over_measured" in r:
        print(
            f"  memory plan {r['plan_peak_bytes'] / 2**30:.1f} GiB vs measured peak "
            f"{r['measured_peak_bytes'] / 2**30:.1f} GiB ({r['plan_over_measured']:.2f}x)"
        )
