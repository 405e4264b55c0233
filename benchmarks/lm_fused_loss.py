"""The fused token divergence (``projected_token_divergence``) against the plain one on
materialised logits (``h @ W.T`` for student and teacher, then ``token_divergence`` and
``token_mean``), value and gradient w.r.t. the student's hidden states and output weight, for the
forward KL, the reverse KL and the JSD.

Memory: XLA's compiled allocation (temporaries + arguments + outputs) at the issue's size, 8,192
tokens x 151,936 vocabulary x hidden 1,024, float32, from compiling alone (the plain version needs
~30 GB; nothing is run). Time: best of 3, side by side, at a size this CPU runs in seconds
(1,024 tokens x 32,768 x 512), or at the full size on an accelerator.

Writes "lm_fused_loss" to runs/bench/results.json: ``peak_ratio`` = fused peak / plain peak
(target <= 1/8), ``time_ratio`` = fused time / plain time (target <= 1.2).

    .venv/bin/python benchmarks/lm_fused_loss.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from common import peak_bytes, write
from jkd import losses

FULL = (8192, 151936, 1024)
CPU_TIMED = (1024, 32768, 512)
CHUNK = 256
DIVERGENCES = {
    "forward_kl": losses.ForwardKL(),
    "reverse_kl": losses.ReverseKL(),
    "jsd": losses.GeneralizedJSD(beta=0.5),
}


def _fns(div, chunk=CHUNK):
    def plain(hs, ws, ht, wt):
        per_token = losses.token_divergence(hs @ ws.T, jax.lax.stop_gradient(ht @ wt.T), divergence=div)
        return losses.token_mean(per_token)

    def fused(hs, ws, ht, wt):
        return losses.projected_token_divergence(hs, ws, ht, wt, divergence=div, chunk_size=chunk)

    return {
        "plain": jax.jit(jax.value_and_grad(plain, argnums=(0, 1))),
        "fused": jax.jit(jax.value_and_grad(fused, argnums=(0, 1))),
    }


def _shapes(tokens, vocab, hidden):
    s = jax.ShapeDtypeStruct
    return (
        s((tokens, hidden), jnp.float32),
        s((vocab, hidden), jnp.float32),
        s((tokens, hidden), jnp.float32),
        s((vocab, hidden), jnp.float32),
    )


def run(timed=None, chunk: int = CHUNK) -> dict:
    on_cpu = jax.devices()[0].platform == "cpu"
    timed = timed or (CPU_TIMED if on_cpu else FULL)
    out = {"full_size": FULL, "timed_size": timed, "chunk": chunk, "device": jax.devices()[0].device_kind}
    k = jax.random.split(jax.random.key(0), 4)
    t, v, d = timed
    args = (
        jax.random.normal(k[0], (t, d)),
        jax.random.normal(k[1], (v, d)) / d**0.5,
        jax.random.normal(k[2], (t, d)),
        jax.random.normal(k[3], (v, d)) / d**0.5,
    )
    for name, div in DIVERGENCES.items():
        fns = _fns(div, chunk)
        r = {}
        for way, fn in fns.items():
            r[f"{way}_peak_gb"] = peak_bytes(fn.lower(*_shapes(*FULL)).compile()) / 1e9
            compiled = fn.lower(*args).compile()
            value = jax.block_until_ready(compiled(*args))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                times.append(time.perf_counter() - t0)
            r[f"{way}_s"] = min(times)
            r[f"{way}_value"] = float(value[0])
        r["peak_ratio"] = r["fused_peak_gb"] / r["plain_peak_gb"]
        r["time_ratio"] = r["fused_s"] / r["plain_s"]
        r["value_rel_diff"] = abs(r["fused_value"] - r["plain_value"]) / abs(r["plain_value"])
        out[name] = r
    return out


def report(r: dict) -> str:
    lines = [f"lm_fused_loss (chunk {r['chunk']}; peak at {r['full_size']}, time at {r['timed_size']}, {r['device']}):"]
    for name in DIVERGENCES:
        x = r[name]
        lines.append(
            f"  {name}: peak {x['fused_peak_gb']:.2f} GB vs {x['plain_peak_gb']:.2f} GB (ratio "
            f"{x['peak_ratio']:.3f}, target <= 0.125); time {x['fused_s'] * 1e3:.0f} vs {x['plain_s'] * 1e3:.0f} ms "
            f"(ratio {x['time_ratio']:.2f}, target <= 1.2); values differ by {x['value_rel_diff']:.1e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    chunk = int(sys.argv[1]) if len(sys.argv) > 1 else CHUNK
    r = run(chunk=chunk)
    write("lm_fused_loss" if chunk == CHUNK else f"lm_fused_loss_chunk{chunk}", r)
    print(report(r))
