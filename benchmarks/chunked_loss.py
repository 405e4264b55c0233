"""Peak memory and time of the chunked vs the plain soft-distillation loss (value and gradient),
8,192 tokens x 32,768 classes, float32 logits, side by side in one process.

float32, not bf16: XLA's CPU backend normalises bf16 to f32 and converts whole bf16 inputs
before the chunk loop (2.5 GiB of temporaries either way), which measures the CPU backend, not
the loss. On accelerators bf16 is native.

Run: `.venv/bin/python benchmarks/chunked_loss.py` (also part of `make bench`). Memory is XLA's
compiled temporary allocation (`memory_analysis().temp_size_in_bytes`) plus the arguments;
time is the best of 3 runs. Writes the entry "chunked_soft_loss" of runs/bench/results.json:
`ratio` = plain peak / chunked peak, arguments and gradient output included (target >= 4);
`temp_ratio` = the same for the temporaries the loss itself allocates; `time_ratio` = chunked
time / plain time (target <= 1.2).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from common import compiled_footprint
from jkd import losses

TOKENS, CLASSES, CHUNK = 8192, 32768, 512


def _compiled(fn, s, t):
    """value_and_grad of the mean loss w.r.t. the student logits, compiled."""
    return jax.jit(lambda x, y: jax.value_and_grad(lambda z: fn(z, y).mean())(x)).lower(s, t).compile()


def run(tokens=TOKENS, classes=CLASSES, chunk=CHUNK) -> dict:
    k1, k2 = jax.random.split(jax.random.key(0))
    s = 3 * jax.random.normal(k1, (tokens, classes), jnp.float32)
    t = 3 * jax.random.normal(k2, (tokens, classes), jnp.float32)
    plain = lambda x, y: losses.soft_distillation_loss(x, y, temperature=2.0)  # noqa: E731
    chunked = lambda x, y: losses.chunked_soft_distillation_loss(x, y, temperature=2.0, chunk_size=chunk)  # noqa: E731
    out = {}
    for name, fn in (("plain", plain), ("chunked", chunked)):
        out[name] = compiled_footprint(_compiled(fn, s, t), s, t)
        del out[name]["output"]
    return {
        "what": f"soft KD value+grad, {tokens} tokens x {classes} classes, f32 logits, chunk {chunk}",
        "plain": out["plain"],
        "chunked": out["chunked"],
        "ratio": out["plain"]["peak_bytes"] / out["chunked"]["peak_bytes"],
        "temp_ratio": out["plain"]["temp_bytes"] / out["chunked"]["temp_bytes"],
        "time_ratio": out["chunked"]["seconds"] / out["plain"]["seconds"],
        "targets": {"ratio": ">= 4", "time_ratio": "<= 1.2"},
    }


if __name__ == "__main__":
    from common import write

    r = run(*(int(a) for a in sys.argv[1:]))
    write("chunked_soft_loss", r)
    gib = 1 << 30
    print(
        f"plain: peak {r['plain']['peak_bytes'] / gib:.2f} GiB, {r['plain']['seconds']:.2f} s; "
        f"chunked: peak {r['chunked']['peak_bytes'] / gib:.2f} GiB, {r['chunked']['seconds']:.2f} s; "
        f"peak saving x{r['ratio']:.2f}, temporaries x{r['temp_ratio']:.1f}, time ratio {r['time_ratio']:.2f}"
    )
