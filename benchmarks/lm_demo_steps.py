"""The agent demo's training steps, side by side: what packing and the on-policy step's single
gradient save, at the demo's shapes (teacher 4x128, student 2 of its layers, vocabulary 1,024).

1. Packing: a teacher step on 16 unpacked rows of 128 tokens against 6 packed rows of 256
   (``jkd.data.conversations.packed_batches``), per conversation, on conversations with the
   embedded data's length mix (78.6 tokens on average, 115 at most). ``ratio``: unpacked seconds
   per conversation over packed.
2. On-policy with 3 seeds vmapped in one step (as the demo trains them), ``student_fraction=0.5``,
   48 new tokens, against a token-KD step on the same rows: ``on_policy_cost`` (target: <= 2).
   ``both_branches_cost`` is the same step written as the ``cond`` between two gradient
   computations it used to be: under ``vmap`` a ``cond`` on a per-seed draw runs both branches.
"""

from __future__ import annotations

import dataclasses
import functools

from common import seconds_per_call, write

import jax  # noqa: E402  (after common: jkd's CPU settings first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jkd.data import conversations as C  # noqa: E402
from jkd.losses import GeneralizedJSD  # noqa: E402
from jkd.jobs.lm import _decoder  # noqa: E402
from jkd.models.decoder import Decoder  # noqa: E402
from jkd.train import create_train_state, freeze_model, parallel, stack_states  # noqa: E402
from jkd.train.lm_steps import (
    OnPolicyKD,
    TokenKD,
    apply_gradients,
    learned_positions,
    on_policy_step,  # noqa: E402
    prompt_and_completion,
    token_kd_loss,
    token_kd_step,
)
from jkd.models.sampler import default_pad_id, generate_tokens, stop_token_array  # noqa: E402

CONFIG = dataclasses.replace(_decoder(1024, 128, 4), max_position_embeddings=256, eos_token_id=1, pad_token_id=0)
SEEDS, STEPS, REPEATS = 3, 4, 5


def _conversations(n=3000, seed=0):
    """Token rows with the embedded conversations' length mix (15% under 64 tokens, 56% 64-96,
    29% 96-115), the first half of each a prompt."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice(np.r_[rng.integers(20, 64, 15), rng.integers(64, 96, 56), rng.integers(96, 116, 29)], n)
    ids = [rng.integers(2, 1024, int(m)).astype(np.int32) for m in lengths]
    return ids, [np.arange(len(i)) >= len(i) // 2 for i in ids]


def _best_per_step(cases: list[tuple]) -> list[float]:
    """Best seconds per step of each ``(run, state, batches, *args)``, timed in alternation (one
    round of every case, ``REPEATS`` rounds) so the machine's drift reaches each alike."""
    holders = [{"state": c[1]} for c in cases]

    def steps(case, holder):
        run, _, batches, *args = case
        for b in batches:
            holder["state"], m = run(holder["state"], b, *args)
        jax.block_until_ready(m["loss"])

    for c, h in zip(cases, holders):
        steps(c, h)  # compile
    best = [float("inf")] * len(cases)
    for _ in range(REPEATS):
        for i, (c, h) in enumerate(zip(cases, holders)):
            best[i] = min(best[i], seconds_per_call(lambda: steps(c, h)) / len(c[2]))
    return best


def packing() -> dict:
    ids, learn = _conversations()
    tx = optax.adamw(1e-3)
    g, state = create_train_state(Decoder(CONFIG, rngs=nnx.Rngs(0)), tx, seed=0)
    run = parallel.single_device(functools.partial(token_kd_step, graphdef=g, teacher_graphdef=None, tx=tx))
    ce = TokenKD(kd_weight=0.0, ce_weight=1.0)
    plain = C.sequence_batches(ids, learn, batch_size=16, length=128, pad_id=0)
    packed = C.packed_batches(ids, learn, rows=6, length=256, pad_id=0)
    plain_b = [next(plain) for _ in range(STEPS)]
    packed_b = [next(packed) for _ in range(STEPS)]
    per_step_packed = float(np.mean([b["segment_ids"].max(axis=1).sum() for b in packed_b]))
    _, state2 = create_train_state(Decoder(CONFIG, rngs=nnx.Rngs(0)), tx, seed=0)
    plain_s, packed_s = _best_per_step([(run, state, plain_b, ce), (run, state2, packed_b, ce)])
    return {
        "unpacked_s_per_step": plain_s,
        "packed_s_per_step": packed_s,
        "conversations_per_step": {"unpacked": 16, "packed": per_step_packed},
        "ratio": (plain_s / 16) / (packed_s / per_step_packed),
    }


def _both_branches_step(state, batch, objective, teacher, *, graphdef, teacher_graphdef, tx):
    """The on-policy step as it was: ``cond`` between two gradient computations (a reference for
    the cost only)."""
    key = jax.random.fold_in(state.rng, state.step)
    draw, sample_key = jax.random.split(key)
    use_student = jax.random.bernoulli(draw, objective.student_fraction)
    kd = objective.token_kd()
    teacher_model = nnx.merge(teacher_graphdef, teacher.params, teacher.batch_stats, teacher.rest)
    student = nnx.merge(graphdef, state.params, state.batch_stats, state.rest)

    def grads_on(seqs):
        n = jnp.sum(learned_positions(seqs), dtype=jnp.int32)

        def loss_fn(params):
            return token_kd_loss(
                nnx.merge(graphdef, params, state.batch_stats, state.rest), teacher_model, seqs, kd, num_tokens=n
            )

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return loss, grads

    def sampled(_):
        pad = default_pad_id(student.config)
        new, n_new = generate_tokens(
            student,
            batch["prompt_tokens"],
            batch["prompt_lengths"],
            sample_key,
            stop_token_array(student.config.eos_token_ids),
            max_new_tokens=objective.max_new_tokens,
            sampling=objective.sampling,
            pad_id=pad,
        )
        return grads_on(prompt_and_completion(batch["prompt_tokens"], batch["prompt_lengths"], new, n_new, pad_id=pad))

    def given(_):
        return grads_on({k: batch[k] for k in ("tokens", "loss_mask", "attention_mask")})

    loss, grads = jax.lax.cond(use_student, sampled, given, None)
    return apply_gradients(state, grads, tx), {"loss": loss}


def on_policy() -> dict:
    teacher = Decoder(CONFIG, rngs=nnx.Rngs(1))
    tg, frozen = freeze_model(teacher)
    scfg = dataclasses.replace(CONFIG, num_layers=2)
    tx = optax.adamw(1e-3)
    ids, learn = _conversations()
    streams = [C.sequence_batches(ids, learn, batch_size=16, length=128, pad_id=0, seed=s) for s in range(SEEDS)]
    batches = []
    for _ in range(STEPS):
        bs = [next(s) for s in streams]
        b = {k: np.stack([x[k] for x in bs], axis=1) for k in ("tokens", "loss_mask", "attention_mask")}
        lengths = np.clip(np.argmax(b["loss_mask"], axis=2), 1, 48).astype(np.int32)
        b["prompt_tokens"] = np.where(np.arange(48)[None, None] < lengths[..., None], b["tokens"][..., :48], 0)
        b["prompt_lengths"] = lengths
        batches.append(b)

    def states():
        made = [create_train_state(Decoder(scfg, rngs=nnx.Rngs(s)), tx, seed=s) for s in range(SEEDS)]
        return made[0][0], stack_states([m[1] for m in made])

    def vmapped(fn, g):
        return parallel.single_device(
            jax.vmap(functools.partial(fn, graphdef=g, teacher_graphdef=tg, tx=tx), in_axes=(0, 1, None, None))
        )

    jsd = GeneralizedJSD(beta=0.5)
    op = OnPolicyKD(divergence=jsd, student_fraction=0.5, max_new_tokens=48)
    g, st = states()
    given = [{k: b[k] for k in ("tokens", "loss_mask", "attention_mask")} for b in batches]
    kd_s, op_s, both_s = _best_per_step(
        [
            (vmapped(token_kd_step, g), st, given, TokenKD(divergence=jsd), frozen),
            (vmapped(on_policy_step, g), states()[1], batches, op, frozen),
            (vmapped(_both_branches_step, g), states()[1], batches, op, frozen),
        ]
    )
    return {
        "seeds": SEEDS,
        "token_kd_s": kd_s,
        "on_policy_s": op_s,
        "both_branches_s": both_s,
        "on_policy_cost": op_s / kd_s,
        "both_branches_cost": both_s / kd_s,
        "ratio": both_s / op_s,
        "target": 2.0,
    }


def run() -> dict:
    return {"packing": packing(), "on_policy_seeds": on_policy()}


def report(r: dict) -> str:
    p, o = r["packing"], r["on_policy_seeds"]
    return (
        f"lm_demo_steps: packed 6x256 vs 16x128 rows, {p['conversations_per_step']['packed']:.1f} vs 16 "
        f"conversations a step, {p['packed_s_per_step'] * 1e3:.0f} vs {p['unpacked_s_per_step'] * 1e3:.0f} ms: "
        f"x{p['ratio']:.2f} per conversation; on-policy (3 seeds vmapped, lambda 0.5) "
        f"{o['on_policy_cost']:.2f}x a token-KD step (target <= 2; with both branches "
        f"{o['both_branches_cost']:.2f}x)"
    )


if __name__ == "__main__":
    r = run()
    write("lm_demo_steps", r)
    print(report(r))
