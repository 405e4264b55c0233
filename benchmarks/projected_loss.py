"""Peak memory and time of soft distillation from hidden states over a large vocabulary:
the plain loss on materialised logits (``h @ W`` for student and teacher, then
``soft_distillation_loss``) against ``projected_token_divergence`` (projections fused into
chunks of rows), value and gradient w.r.t. the student's hidden states and projection, side by
side in one process. 8,192 tokens x 32,768 classes, hidden size 512, float32, chunk 512.

Memory is XLA's compiled allocation (temporaries + arguments + outputs); time is the best of 3.
Writes "projected_soft_loss" to runs/bench/results.json: ``ratio`` = plain peak / fused peak
(target >= 4), ``time_ratio`` = fused time / plain time (target <= 1.2).

    .venv/bin/python benchmarks/projected_loss.py [tokens classes hidden chunk]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from common import compiled_footprint
from jkd import losses

TOKENS, CLASSES, HIDDEN, CHUNK, T = 8192, 32768, 512, 512, 2.0


def run(tokens=TOKENS, classes=CLASSES, hidden=HIDDEN, chunk=CHUNK) -> dict:
    k = jax.random.split(jax.random.key(0), 4)
    hs = jax.random.normal(k[0], (tokens, hidden), jnp.float32)
    ws = jax.random.normal(k[1], (hidden, classes), jnp.float32) / hidden**0.5
    ht = jax.random.normal(k[2], (tokens, hidden), jnp.float32)
    wt = jax.random.normal(k[3], (hidden, classes), jnp.float32) / hidden**0.5

    def plain(a, b, c, d):
        return jnp.mean(losses.soft_distillation_loss(a @ b, jax.lax.stop_gradient(c @ d), temperature=T))

    def fused(a, b, c, d):  # the weights in the layout the decoder holds, [classes, hidden]
        return T**2 * losses.projected_token_divergence(a, b, c, d, temperature=T, chunk_size=chunk)

    out = {}
    for name, fn, (b, d) in (("plain", plain, (ws, wt)), ("fused", fused, (ws.T.copy(), wt.T.copy()))):
        comp = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(hs, b, ht, d).compile()
        out[name] = compiled_footprint(comp, hs, b, ht, d)
        out[name]["value"] = float(out[name].pop("output")[0])
    return {
        "what": f"soft KD from hidden states, value+grad, {tokens} tokens x {classes} classes, hidden {hidden}, "
        f"f32, chunk {chunk}",
        "plain": out["plain"],
        "fused": out["fused"],
        "ratio": out["plain"]["peak_bytes"] / out["fused"]["peak_bytes"],
        "time_ratio": out["fused"]["seconds"] / out["plain"]["seconds"],
        "value_relative_difference": abs(out["fused"]["value"] - out["plain"]["value"]) / abs(out["plain"]["value"]),
        "targets": {"ratio": ">= 4", "time_ratio": "<= 1.2"},
    }


if __name__ == "__main__":
    from common import write

    r = run(*(int(a) for a in sys.argv[1:]))
    write("projected_soft_loss", r)
    gib = 1 << 30
    print(
        f"plain: peak {r['plain']['peak_bytes'] / gib:.2f} GiB, {r['plain']['seconds']:.2f} s; "
        f"fused: peak {r['fused']['peak_bytes'] / gib:.2f} GiB, {r['fused']['seconds']:.2f} s; "
        f"peak saving x{r['ratio']:.1f}, time ratio {r['time_ratio']:.2f}, values differ by "
        f"{r['value_relative_difference']:.1e} (relative)"
    )
