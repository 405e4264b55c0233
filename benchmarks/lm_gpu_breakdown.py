"""Where a bf16 token-KD step's time goes on an accelerator (lm_gpu_check's models): teacher
forward, student forward + backward without the loss, the fused loss's forward + backward alone,
the whole step. ``--tiny`` checks the script on a CPU.

    python benchmarks/lm_gpu_breakdown.py [--tiny] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jkd.losses import ForwardKL, projected_token_divergence
from jkd.models.decoder import Decoder
from lm_gpu_check import FULL, TINY


def _best(fn, n=5):
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def main(tiny: bool, chunk: int) -> None:
    s = TINY if tiny else FULL
    b, t = s["batch"], s["tokens"]
    teacher = Decoder(s["teacher"], dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    student = Decoder(s["student"], dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    tg, ts = nnx.split(teacher)
    sg, ss = nnx.split(student)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, s["student"].vocab_size, (b, t)), jnp.int32)
    tf = jax.jit(lambda p, x: nnx.merge(tg, p).hidden_states(x))
    ht = tf(ts, toks)
    out = {"teacher_forward": _best(lambda: tf(ts, toks))}
    body = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(sg, p).hidden_states(x).astype(jnp.float32) ** 2)))
    out["student_forward_backward"] = _best(lambda: body(ss, toks))
    hs = nnx.merge(sg, ss).hidden_states(toks)
    ws, wt = student.output_weight(), teacher.output_weight()
    loss = jax.jit(
        jax.grad(
            lambda h, w: projected_token_divergence(
                h,
                w,
                ht,
                wt,
                divergence=ForwardKL(),
                labels=toks,
                label_weight=0.5,
                divergence_weight=0.5,
                chunk_size=chunk,
            ),
            argnums=(0, 1),
        )
    )
    out[f"fused_loss_chunk{chunk}"] = _best(lambda: loss(hs, ws))
    for k, v in out.items():
        print(f"{k}: {v * 1e3:.1f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--chunk", type=int, default=2048)
    a = p.parse_args()
    main(a.tiny, a.chunk)
