"""Run in a fresh process by tests/train/test_memory_plan.py: plan a token-KD step with XLA's
memory analysis, then run it and measure the process's peak resident memory during the step.

Prints one JSON line: the plan's peak and the measured one (bytes). The step's arguments (teacher,
state, batch) are allocated before the high-water mark is reset, and counted in; what the step
adds on top is read from VmHWM."""

from __future__ import annotations

import functools
import gc
import json

import jax
import numpy as np
from flax import nnx

from jkd.models.decoder import Decoder
from jkd.models.decoder_config import DecoderConfig
from jkd.train import AdamWConfig, make_optimizer, parallel
from jkd.train import memory_plan as MP
from jkd.train.lm_steps import TokenKD, token_kd_step
from jkd.train.state import create_train_state, freeze_model, split_model

B, T, V = 4, 256, 8192
TEACHER = DecoderConfig(
    vocab_size=V,
    hidden_size=512,
    intermediate_size=1376,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    max_position_embeddings=512,
)
STUDENT = DecoderConfig(
    vocab_size=V,
    hidden_size=256,
    intermediate_size=688,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=512,
)


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _high_water() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main() -> None:
    tx = make_optimizer(AdamWConfig(), steps_per_epoch=10, total_steps=10)
    tg, teacher_abstract = freeze_model(nnx.eval_shape(lambda: Decoder(TEACHER, rngs=nnx.Rngs(0))))
    graphdef = split_model(nnx.eval_shape(lambda: Decoder(STUDENT, rngs=nnx.Rngs(0))))[0]
    run = parallel.single_device(functools.partial(token_kd_step, graphdef=graphdef, teacher_graphdef=tg, tx=tx))
    state_abstract = jax.eval_shape(lambda: create_train_state(Decoder(STUDENT, rngs=nnx.Rngs(0)), tx, seed=0)[1])
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, V, (B, T)).astype(np.int32), "loss_mask": np.ones((B, T), bool)}
    objective = TokenKD(kd_weight=1.0, ce_weight=0.5)
    params = MP.per_device_bytes(state_abstract.params)
    plan = MP.compiled_step_memory(
        run.lower(state_abstract, batch, objective, teacher_abstract),
        name="token KD",
        teacher=MP.per_device_bytes(teacher_abstract),
        student=params,
        optimizer=MP.per_device_bytes(state_abstract.opt_state),
        gradients=params,
        loss_chunk=MP.fused_loss_chunk(B * (T - 1), 1024, V, with_teacher=True),
    )
    _, teacher = freeze_model(Decoder(TEACHER, rngs=nnx.Rngs(1)))
    _, state = create_train_state(Decoder(STUDENT, rngs=nnx.Rngs(2)), tx, seed=0)
    jax.block_until_ready((teacher, state))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the resident memory now
    before = _resident()
    state, metrics = run(state, batch, objective, teacher)
    jax.block_until_ready(metrics)
    measured = _high_water() - before + MP.per_device_bytes((teacher, state)) + sum(v.nbytes for v in batch.values())
    print(
        json.dumps(
            {"plan": plan.peak, "measured": measured, "arguments": plan.arguments, "temporaries": plan.temporaries}
        )
    )


if __name__ == "__main__":
    main()
