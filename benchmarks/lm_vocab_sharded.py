"""The fused token divergence with the vocabulary split over 4 ``model`` shards, against the same
loss on one device: memory per device from XLA's compiled memory analysis (compiling alone,
nothing run), at 8,192 tokens x 151,936 vocabulary x hidden 1,024, float32, value and gradients
w.r.t. the student's hidden states and output weight.

The split is the decoder's partition rule for ``lm_head`` (rows over ``model``): the weights are
placed ``P('model', None)``, the hidden states replicated, and XLA's partitioner keeps every
``[tokens, vocab]`` product and the log-sum-exp vocabulary-parallel (per-shard maxima and sums
combined by all-reduce). The compiled module is also checked for all-gathers: none may hold the
whole vocabulary.

Writes "lm_vocab_sharded" to runs/bench/results.json: ``per_device_ratio`` = sharded peak per
device / one-device peak (target <= 1/3). Needs 4 devices (on a CPU: JAX_NUM_CPU_DEVICES=4, set
here before JAX starts).

    .venv/bin/python benchmarks/lm_vocab_sharded.py
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from common import peak_bytes, write  # noqa: E402
from jkd import losses  # noqa: E402
from jkd.models.decoder_sharding import make_mesh  # noqa: E402
from jkd.train.parallel import all_gather_shapes  # noqa: E402

TOKENS, VOCAB, HIDDEN, SHARDS, CHUNK = 8192, 151936, 1024, 4, 1024


def _loss(hs, ws, ht, wt):
    return losses.projected_token_divergence(hs, ws, ht, wt, divergence=losses.ForwardKL(), chunk_size=CHUNK)


def run() -> dict:
    if jax.device_count() < SHARDS:
        raise RuntimeError(f"needs {SHARDS} devices; this process has {jax.device_count()}")
    s = jax.ShapeDtypeStruct
    args = (
        s((TOKENS, HIDDEN), jnp.float32),
        s((VOCAB, HIDDEN), jnp.float32),
        s((TOKENS, HIDDEN), jnp.float32),
        s((VOCAB, HIDDEN), jnp.float32),
    )
    grad = jax.value_and_grad(_loss, argnums=(0, 1))
    one = jax.jit(grad).lower(*args).compile()
    mesh = make_mesh(1, SHARDS, devices=jax.devices()[:SHARDS])
    rows, rep = NamedSharding(mesh, P("model", None)), NamedSharding(mesh, P())
    sharded = jax.jit(grad, in_shardings=(rep, rows, rep, rows)).lower(*args).compile()
    gathers = [s for s in all_gather_shapes(sharded.as_text()) if VOCAB in s]
    one_peak, shard_peak = peak_bytes(one), peak_bytes(sharded)
    return {
        "size": [TOKENS, VOCAB, HIDDEN],
        "model_shards": SHARDS,
        "chunk": CHUNK,
        "one_device_peak_bytes": one_peak,
        "sharded_peak_bytes_per_device": shard_peak,
        "per_device_ratio": shard_peak / one_peak,
        "target": 1 / 3,
        "whole_vocab_all_gathers": gathers,
        "device": jax.devices()[0].device_kind,
    }


def report(r: dict) -> str:
    gib = 2**30
    return (
        f"lm_vocab_sharded: peak per device {r['sharded_peak_bytes_per_device'] / gib:.2f} GiB on "
        f"{r['model_shards']} model shards vs {r['one_device_peak_bytes'] / gib:.2f} GiB on one device "
        f"(x{r['per_device_ratio']:.3f}, target <= {r['target']:.3f}); all-gathers holding the whole vocabulary: "
        f"{len(r['whole_vocab_all_gathers'])}"
    )


if __name__ == "__main__":
    result = run()
    write("lm_vocab_sharded", result)
    print(report(result))
