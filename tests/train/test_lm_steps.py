"""Token-level distillation steps: the token mean of the whole step (gradient accumulation and
devices), the loss against an independent float64 computation, and learning."""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jkd.losses import ForwardKL, GeneralizedJSD
from jkd.models.decoder import Decoder
from jkd.models.decoder_config import DecoderConfig
from jkd.models.decoder_sharding import batch_sharding, make_mesh
from jkd.train import optim
from jkd.train.lm_steps import (
    OnPolicyKD,
    TokenKD,
    learned_positions,
    on_policy_step,
    prompt_and_completion,
    token_kd_loss,
    token_kd_step,
)
from jkd.models.sampler import SamplingConfig, generate
from jkd.train.state import create_train_state, freeze_model

VOCAB = 48  # the shared vocabulary; the teacher's embedding has 4 padding rows beyond it
TEACHER = DecoderConfig(
    vocab_size=VOCAB + 4,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    family="qwen2",
    max_position_embeddings=64,
)
STUDENT = DecoderConfig(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    family="llama",
    max_position_embeddings=64,
)


def _batch(seed=0, b=8, t=24):
    """Sequences of very different lengths (3..24), right-padded; the first third of each is a
    prompt that is not learned."""
    rng = np.random.default_rng(seed)
    lengths = np.array([3, 24, 7, 16, 24, 5, 11, 20])[:b]
    tokens = rng.integers(0, VOCAB, (b, t)).astype(np.int32)
    attention = np.arange(t)[None] < lengths[:, None]
    loss_mask = attention & (np.arange(t)[None] >= lengths[:, None] // 3)
    tokens[~attention] = 0
    return {
        "tokens": jnp.asarray(tokens),
        "attention_mask": jnp.asarray(attention),
        "loss_mask": jnp.asarray(loss_mask),
    }


def _setup(tx, seed=0):
    teacher = Decoder(TEACHER, rngs=nnx.Rngs(seed + 1))
    # a peaked teacher: larger weights than the 0.02 initialisation
    nnx.update(teacher, jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, nnx.state(teacher)))
    tg, frozen = freeze_model(teacher)
    g, state = create_train_state(Decoder(STUDENT, rngs=nnx.Rngs(seed)), tx, seed=0)
    return g, state, tg, frozen


def _step(tx, objective, micro_batches=1):
    def step(state, batch, frozen, g, tg):
        return token_kd_step(
            state, batch, objective, frozen, graphdef=g, teacher_graphdef=tg, tx=tx, micro_batches=micro_batches
        )

    return jax.jit(step, static_argnums=(3, 4))


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_loss_is_the_token_mean_of_the_whole_batch():
    """The step's loss equals the mean over every learned token of the batch, computed in float64
    numpy from the two models' logits (not a mean of per-sequence means)."""
    tx = optax.sgd(0.1)
    g, state, tg, frozen = _setup(tx)
    batch = _batch()
    objective = TokenKD(
        divergence=ForwardKL(), temperature=2.0, kd_weight=0.8, ce_weight=0.2, vocab_size=VOCAB, chunk_size=16
    )
    _, metrics = _step(tx, objective)(state, batch, frozen, g, tg)
    student = nnx.merge(g, state.params, state.batch_stats, state.rest)
    teacher = nnx.merge(tg, frozen.params, frozen.batch_stats, frozen.rest)
    am = batch["attention_mask"]
    s = np.asarray(student(batch["tokens"], attention_mask=am))[:, :-1, :VOCAB]
    t = np.asarray(teacher(batch["tokens"], attention_mask=am))[:, :-1, :VOCAB]
    lq, lp = _log_softmax64(s / 2.0), _log_softmax64(t / 2.0)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    ce = -np.take_along_axis(_log_softmax64(s), np.asarray(batch["tokens"])[:, 1:, None], -1)[..., 0]
    where = np.asarray(learned_positions(batch))
    want = (0.8 * kl + 0.2 * ce)[where].mean()
    per_sequence_means = np.mean([(0.8 * kl + 0.2 * ce)[i][where[i]].mean() for i in range(8)])
    assert int(metrics["tokens"]) == where.sum()
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
    assert abs(per_sequence_means - want) > 1e-3 * abs(want)  # the two means really differ here


@pytest.mark.parametrize(
    "objective",
    [
        TokenKD(divergence=ForwardKL(), vocab_size=VOCAB, ce_weight=0.5, chunk_size=16),
        TokenKD(divergence=GeneralizedJSD(beta=0.3), vocab_size=VOCAB, chunk_size=64),
    ],
    ids=["forward_kl+ce", "jsd"],
)
def test_four_micro_batches_equal_one_batch(objective):
    tx = optax.sgd(0.5)
    g, state, tg, frozen = _setup(tx)
    batch = _batch(1)
    one, m1 = _step(tx, objective, 1)(state, batch, frozen, g, tg)
    four, m4 = _step(tx, objective, 4)(state, batch, frozen, g, tg)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params)))
    assert moved > 1e-4
    for a, b in zip(jax.tree.leaves(four.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_four_devices_equal_one():
    tx = optax.sgd(0.5)
    objective = TokenKD(vocab_size=VOCAB, ce_weight=0.1, chunk_size=16)
    g, state, tg, frozen = _setup(tx)
    batch = _batch(2)
    one, _ = _step(tx, objective)(state, batch, frozen, g, tg)
    mesh = make_mesh(4, 1)
    sharded = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
    four, _ = _step(tx, objective)(state, sharded, frozen, g, tg)
    assert len(sharded["tokens"].sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(four.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    # each device computes the fused loss on its own rows: no hidden states are gathered
    hlo = _step(tx, objective).lower(state, sharded, frozen, g, tg).compile().as_text()
    assert "all-reduce" in hlo and "all-gather" not in hlo


def test_distillation_moves_the_student_toward_the_teacher():
    tx = optim._strict_safe(optax.adam(3e-3))  # optax's bias correction mixes int and float
    objective = TokenKD(vocab_size=VOCAB, chunk_size=64)
    g, state, tg, frozen = _setup(tx)
    batch = _batch(3)
    step = _step(tx, objective)
    first = None
    for _ in range(40):
        state, metrics = step(state, batch, frozen, g, tg)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.5 * first


def test_bad_objectives():
    with pytest.raises(ValueError, match="both 0"):
        TokenKD(kd_weight=0.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="temperature"):
        TokenKD(temperature=0.0)
    tx = optax.sgd(0.1)
    g, state, _, _ = _setup(tx)
    with pytest.raises(ValueError, match="needs the teacher"):
        token_kd_step(state, _batch(), TokenKD(), None, graphdef=g, teacher_graphdef=None, tx=tx)
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        token_kd_step(
            state,
            _batch(),
            TokenKD(kd_weight=0.0, ce_weight=1.0),
            None,
            graphdef=g,
            teacher_graphdef=None,
            tx=tx,
            micro_batches=3,
        )


# ---- on-policy distillation (GKD) -----------------------------------------------------------


def _with_prompts(batch):
    """The batch plus its prompts: each row's tokens before its first learned token."""
    loss_mask = np.asarray(batch["loss_mask"])
    lengths = np.argmax(loss_mask, axis=1).astype(np.int32)
    p = int(lengths.max())
    prompts = np.where(np.arange(p)[None] < lengths[:, None], np.asarray(batch["tokens"])[:, :p], 0)
    return {**batch, "prompt_tokens": jnp.asarray(prompts, jnp.int32), "prompt_lengths": jnp.asarray(lengths)}


def test_prompt_and_completion_join_rows():
    out = prompt_and_completion(
        jnp.array([[5, 6, 0], [7, 0, 0]]), jnp.array([2, 1]), jnp.array([[1, 2], [3, 4]]), jnp.array([1, 2]), pad_id=9
    )
    assert np.asarray(out["tokens"]).tolist() == [[5, 6, 1, 9, 9], [7, 3, 4, 9, 9]]
    assert np.asarray(out["loss_mask"]).tolist() == [
        [False, False, True, False, False],
        [False, True, True, False, False],
    ]
    assert np.asarray(out["attention_mask"]).sum(1).tolist() == [3, 3]


def _on_policy(tx, objective, g, tg):
    return jax.jit(lambda s, b, f: on_policy_step(s, b, objective, f, graphdef=g, teacher_graphdef=tg, tx=tx))


def test_on_policy_with_fraction_0_is_token_kd():
    tx = optax.sgd(0.5)
    g, state, tg, frozen = _setup(tx)
    batch = _with_prompts(_batch(4))
    obj = OnPolicyKD(divergence=GeneralizedJSD(beta=0.5), student_fraction=0.0, vocab_size=VOCAB, chunk_size=32)
    a, ma = _on_policy(tx, obj, g, tg)(state, batch, frozen)
    b, _ = _step(tx, TokenKD(divergence=GeneralizedJSD(beta=0.5), vocab_size=VOCAB, chunk_size=32))(
        state, {k: batch[k] for k in ("tokens", "loss_mask", "attention_mask")}, frozen, g, tg
    )
    assert int(ma["on_policy"]) == 0
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_on_policy_with_fraction_1_trains_on_the_students_greedy_continuations():
    """With greedy sampling the student's continuations are known independently (the public
    sampler, itself checked against full forward passes): the step's loss is token KD on them."""
    tx = optax.sgd(0.5)
    g, state, tg, frozen = _setup(tx)
    batch = _with_prompts(_batch(5))
    obj = OnPolicyKD(
        divergence=ForwardKL(),
        student_fraction=1.0,
        max_new_tokens=6,
        sampling=SamplingConfig(temperature=0.0),
        vocab_size=VOCAB,
        chunk_size=32,
    )
    _, metrics = _on_policy(tx, obj, g, tg)(state, batch, frozen)
    student = nnx.merge(g, state.params, state.batch_stats, state.rest)
    prompts = [
        np.asarray(batch["prompt_tokens"])[i, :n].tolist() for i, n in enumerate(np.asarray(batch["prompt_lengths"]))
    ]
    gen = generate(student, prompts, max_new_tokens=6, stop_tokens=[], pad_id=0)
    rows = [p + r.tolist() for p, r in zip(prompts, gen.rows())]
    width = max(map(len, rows))
    tokens = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
    attention = np.array([[j < len(r) for j in range(width)] for r in rows])
    learn = np.array([[len(p) <= j < len(r) for j in range(width)] for p, r in zip(prompts, rows)])
    seqs = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attention), "loss_mask": jnp.asarray(learn)}
    teacher = nnx.merge(tg, frozen.params, frozen.batch_stats, frozen.rest)
    want = token_kd_loss(student, teacher, seqs, obj.token_kd(), num_tokens=jnp.sum(learned_positions(seqs)))
    assert int(metrics["on_policy"]) == 1 and int(metrics["tokens"]) == 8 * 6
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)


def test_on_policy_fraction_and_resumable_choices():
    tx = optax.sgd(0.1)
    g, state, tg, frozen = _setup(tx)
    batch = _with_prompts(_batch(6))
    obj = OnPolicyKD(student_fraction=0.5, max_new_tokens=4, vocab_size=VOCAB, chunk_size=64)
    step = _on_policy(tx, obj, g, tg)
    choices, s = [], state
    for _ in range(16):
        s, m = step(s, batch, frozen)
        choices.append(int(m["on_policy"]))
    # a batch without an attention mask (every row full) takes the same path
    full = {k: v for k, v in _with_prompts(_batch(6, t=8)).items() if k != "attention_mask"}
    assert int(step(state, full, frozen)[1]["tokens"]) > 0
    assert 3 <= sum(choices) <= 13
    # a run resumed at step 8 makes the same choices (keyed by the state's RNG and step)
    s8 = state
    for _ in range(8):
        s8, _ = step(s8, batch, frozen)
    again = []
    for _ in range(8):
        s8, m = step(s8, batch, frozen)
        again.append(int(m["on_policy"]))
    assert again == choices[8:]


def test_on_policy_mixed_under_vmap_equals_each_seeds_own_branch():
    """Seeds vmapped in one step draw differently; each seed's update equals the step with its
    drawn branch alone (fraction 1: its samples; fraction 0: the given rows), although both kinds
    of rows are brought to one length (the prompts plus 20 new tokens outrun the given 24)."""
    tx = optax.sgd(0.5)
    g, _, tg, frozen = _setup(tx)
    batch = _with_prompts(_batch(8))
    mixed = OnPolicyKD(student_fraction=0.5, max_new_tokens=20, vocab_size=VOCAB, chunk_size=32)
    states = [create_train_state(Decoder(STUDENT, rngs=nnx.Rngs(0)), tx, seed=s)[1] for s in range(6)]
    step = _on_policy(tx, mixed, g, tg)  # compiled once
    draws = [int(step(s, batch, frozen)[1]["on_policy"]) for s in states]
    pick = [draws.index(0), draws.index(1)]  # one seed on the given rows, one on its samples
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[states[i] for i in pick])
    run = jax.jit(
        jax.vmap(
            lambda s, b, f: on_policy_step(s, b, mixed, f, graphdef=g, teacher_graphdef=tg, tx=tx),
            in_axes=(0, None, None),
        )
    )
    both, metrics = run(stacked, batch, frozen)
    assert np.asarray(metrics["on_policy"]).tolist() == [0, 1]
    for k, (i, fraction) in enumerate(zip(pick, (0.0, 1.0))):
        alone, m = _on_policy(tx, dataclasses.replace(mixed, student_fraction=fraction), g, tg)(
            states[i], batch, frozen
        )
        assert int(m["tokens"]) == int(metrics["tokens"][k])
        np.testing.assert_allclose(float(metrics["loss"][k]), float(m["loss"]), rtol=1e-5)
        for x, y in zip(jax.tree.leaves(both.params), jax.tree.leaves(alone.params)):
            np.testing.assert_allclose(np.asarray(x[k]), np.asarray(y), atol=1e-5, rtol=0)


def test_sharded_teacher_and_student_on_a_2x2_mesh_equal_one_device():
    """Teacher and student split by the decoder's partition rules over ('data', 'model'), the
    batch over 'data': the step's parameters equal one device's."""
    from jkd.models.decoder_sharding import shard_decoder

    tx = optax.sgd(0.5)
    objective = TokenKD(vocab_size=VOCAB, ce_weight=0.2, chunk_size=16)
    g, state, tg, frozen = _setup(tx)
    batch = _batch(7)
    one, _ = _step(tx, objective)(state, batch, frozen, g, tg)
    mesh = make_mesh(2, 2)
    teacher = shard_decoder(nnx.merge(tg, frozen.params, frozen.batch_stats, frozen.rest), mesh)
    student = shard_decoder(nnx.merge(g, state.params, state.batch_stats, state.rest), mesh)
    tg2, frozen2 = freeze_model(teacher)
    g2, state2 = create_train_state(student, tx, seed=0)
    w = state2.params["layers"][0]["mlp"]["up_proj"]["weight"][...]
    assert all(s.data.size * 4 == w.size for s in w.addressable_shards)  # really split four ways
    sharded = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
    four, _ = _step(tx, objective)(state2, sharded, frozen2, g2, tg2)
    for a, b in zip(jax.tree.leaves(four.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_packed_rows_give_the_loss_and_gradient_of_one_sequence_per_row():
    """Sequences packed two to a row (segment ids) train exactly as the same sequences one per row;
    the first token of a packed sequence is learned here, and is still never predicted from the
    sequence before it."""
    tx = optax.sgd(0.5)
    objective = TokenKD(vocab_size=VOCAB, ce_weight=0.3, chunk_size=16)
    g, state, tg, frozen = _setup(tx)
    rng = np.random.default_rng(5)
    lengths = [9, 13, 6, 17, 11, 12]
    seqs = [rng.integers(0, VOCAB, n).astype(np.int32) for n in lengths]
    learn = [rng.random(n) < 0.7 for n in lengths]
    for m in learn:
        m[0] = True
    t = 32
    plain = {
        "tokens": np.zeros((6, t), np.int32),
        "loss_mask": np.zeros((6, t), bool),
        "attention_mask": np.zeros((6, t), bool),
    }
    for r, (s, m) in enumerate(zip(seqs, learn)):
        plain["tokens"][r, : len(s)], plain["loss_mask"][r, : len(s)], plain["attention_mask"][r, : len(s)] = s, m, True
    packed = {k: np.zeros((3, t), v.dtype) for k, v in plain.items()}
    packed["segment_ids"] = np.zeros((3, t), np.int32)
    for r in range(3):
        at = 0
        for s_id, i in enumerate((2 * r, 2 * r + 1), start=1):
            n = lengths[i]
            packed["tokens"][r, at : at + n], packed["loss_mask"][r, at : at + n] = seqs[i], learn[i]
            packed["attention_mask"][r, at : at + n], packed["segment_ids"][r, at : at + n] = True, s_id
            at += n
    one, m1 = _step(tx, objective)(state, plain, frozen, g, tg)
    two, m2 = _step(tx, objective)(state, packed, frozen, g, tg)
    assert int(m2["tokens"]) == int(m1["tokens"]) == sum(int(m[1:].sum()) for m in learn)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(two.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_mixed_precision_keeps_float32_master_weights_and_runs_the_passes_in_bfloat16():
    """compute_dtype=bfloat16: the loss is that of a bfloat16 model holding the master weights
    rounded to bfloat16 (built on its own); the state stays float32; the update is close to the
    float32 step's and not equal to it."""
    tx = optax.sgd(0.5)
    objective = TokenKD(vocab_size=VOCAB, ce_weight=0.3)
    g, state, tg, frozen = _setup(tx)
    batch = _batch(3)

    def step(compute_dtype):
        return jax.jit(
            lambda s, b, f: token_kd_step(
                s, b, objective, f, graphdef=g, teacher_graphdef=tg, tx=tx, compute_dtype=compute_dtype
            )
        )

    mixed, m_mixed = step(jnp.bfloat16)(state, batch, frozen)
    full, m_full = step(None)(state, batch, frozen)
    assert {x.dtype for x in jax.tree.leaves(mixed.params)} == {jnp.dtype(jnp.float32)}
    # the reference: a bfloat16 student of its own, given the rounded weights
    half = Decoder(STUDENT, dtype=jnp.bfloat16, rngs=nnx.Rngs(9))
    nnx.update(half, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.params))
    teacher = nnx.merge(tg, frozen.params, frozen.batch_stats, frozen.rest)
    n = jnp.sum(learned_positions(batch), dtype=jnp.int32)
    hg, hstate = nnx.split(half)
    want = jax.jit(lambda st: token_kd_loss(nnx.merge(hg, st), teacher, batch, objective, num_tokens=n))(hstate)
    assert float(m_mixed["loss"]) == pytest.approx(float(want), rel=1e-6)
    assert float(m_mixed["loss"]) == pytest.approx(float(m_full["loss"]), rel=2e-2)
    assert float(m_mixed["loss"]) != float(m_full["loss"])
    diffs = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(mixed.params), jax.tree.leaves(full.params))
    ]
    moves = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(state.params))
    ]
    assert 0 < max(diffs) < 0.05 * max(moves)
