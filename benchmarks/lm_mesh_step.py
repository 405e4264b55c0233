"""The token-KD training step on one device and on device meshes of 4, side by side in one process.

A random teacher (hidden 512, 4 layers) and student (hidden 256, 2 layers), vocabulary 8,192,
batch 8 x 256 tokens, float32, AdamW, fused forward KL + cross-entropy, as ``jkd lm`` runs them:
:func:`jkd.train.parallel.on_mesh` with the decoders placed by their partition rules
(:func:`jkd.models.decoder_sharding.tree_shardings`) on (1, 4) (tensor parallel), (2, 2) and
(4, 1) (fully sharded data parallel), against :func:`jkd.train.parallel.single_device`. Tokens per
second of the best of 3 rounds of 3 steps after a warm-up; each mesh's ratio to one device; and
XLA's compiled peak memory per device.

On a CPU the 4 devices are simulated (JAX_NUM_CPU_DEVICES=4, set here before JAX starts) and share
this machine's cores, so a ratio here measures the cost of partitioning (the collectives, smaller
products), not a speed-up: on 4 real accelerators each holds a quarter of the work.

Writes "lm_mesh_step" to runs/bench/results.json.

    .venv/bin/python benchmarks/lm_mesh_step.py
"""

from __future__ import annotations

import functools
import os
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import peak_bytes, write  # noqa: E402
from jkd.models.decoder import Decoder  # noqa: E402
from jkd.models.decoder_config import DecoderConfig  # noqa: E402
from jkd.models.decoder_sharding import make_mesh, tree_shardings  # noqa: E402
from jkd.train import AdamWConfig, make_optimizer, parallel  # noqa: E402
from jkd.train.lm_steps import TokenKD, token_kd_step  # noqa: E402
from jkd.train.state import create_train_state, freeze_model  # noqa: E402

B, T, VOCAB = 8, 256, 8192
MESHES = ((1, 4), (2, 2), (4, 1))


def _config(hidden: int, layers: int) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=T,
        tie_embeddings=False,
    )


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, VOCAB, (B, T)).astype(np.int32),
        "loss_mask": np.ones((B, T), bool),
        "attention_mask": np.ones((B, T), bool),
    }


def _measure(run) -> dict:
    tx = make_optimizer(AdamWConfig(learning_rate=1e-4, warmup_epochs=0), steps_per_epoch=10, total_steps=100)
    tg, frozen = freeze_model(Decoder(_config(512, 4), rngs=nnx.Rngs(1)))
    g, state = create_train_state(Decoder(_config(256, 2), rngs=nnx.Rngs(0)), tx, seed=0)
    run = run(functools.partial(token_kd_step, graphdef=g, teacher_graphdef=tg, tx=tx))
    state, frozen = parallel.place(run, state), parallel.place_frozen(run, frozen)
    objective = TokenKD(ce_weight=0.5, kd_weight=0.5, chunk_size=1024)
    batches = [_batch(i) for i in range(3)]
    peak = peak_bytes(run.lower(state, batches[0], objective, frozen).compile())
    state, metrics = run(state, batches[0], objective, frozen)  # warm-up and compilation
    jax.block_until_ready(metrics["loss"])
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for b in batches:
            state, metrics = run(state, b, objective, frozen)
        jax.block_until_ready(metrics["loss"])
        best = min(best, (time.perf_counter() - t0) / len(batches))
    return {
        "seconds_per_step": best,
        "tokens_per_s": B * T / best,
        "peak_bytes_per_device": peak,
        "loss": float(metrics["loss"]),
    }


def run() -> dict:
    if jax.device_count() < 4:
        raise RuntimeError(f"needs 4 devices; this process has {jax.device_count()}")
    out = {
        "batch": [B, T],
        "vocab": VOCAB,
        "device": jax.devices()[0].device_kind,
        "one_device": _measure(parallel.single_device),
    }
    for shape in MESHES:
        mesh = make_mesh(*shape, devices=jax.devices()[:4])
        r = _measure(lambda step: parallel.on_mesh(step, mesh, shardings=tree_shardings))
        r["speed_vs_one_device"] = r["tokens_per_s"] / out["one_device"]["tokens_per_s"]
        out[f"mesh_{shape[0]}x{shape[1]}"] = r
    return out


def report(r: dict) -> str:
    parts = [
        f"one device {r['one_device']['tokens_per_s']:.0f} tok/s "
        f"({r['one_device']['peak_bytes_per_device'] / 2**20:.0f} MiB)"
    ]
    for shape in MESHES:
        m = r[f"mesh_{shape[0]}x{shape[1]}"]
        parts.append(
            f"({shape[0]}, {shape[1]}) {m['tokens_per_s']:.0f} tok/s (x{m['speed_vs_one_device']:.2f}, "
            f"{m['peak_bytes_per_device'] / 2**20:.0f} MiB per device)"
        )
    return "lm_mesh_step: " + "; ".join(parts)


if __name__ == "__main__":
    result = run()
    write("lm_mesh_step", result)
    print(report(result))
