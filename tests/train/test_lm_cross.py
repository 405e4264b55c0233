"""The cross-tokenizer step: on one tokenizer the hybrid is the token-level step; across two real
BPE tokenizers its loss is the float64 reference of the spans the alignment gives, and it learns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jkd.data import toolchat
from jkd.data.align import aligned_rows, shared_tokens
from jkd.losses import ForwardKL
from jkd.models.decoder import Decoder
from jkd.models.decoder_config import DecoderConfig
from jkd.train import optim
from jkd.train.lm_cross import CrossTokenizerKD, cross_tokenizer_step
from jkd.train.lm_steps import TokenKD, token_kd_step
from jkd.train.state import create_train_state, freeze_model
from tests.data.test_align import bpe
from tests.losses.test_cross import log_softmax64, ref_uld

CONVS = [{"messages": c["messages"]} for c in toolchat.generate_split("train", 6, seed=3)]  # no schemas: short rows


def decoder(vocab, hidden, layers, seed, scale=1.0):
    cfg = DecoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=layers,
        num_heads=2,
        num_kv_heads=1,
        family="llama",
        max_position_embeddings=1024,
    )
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    if scale != 1.0:  # a peaked teacher
        nnx.update(model, jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, nnx.state(model)))
    return model


def setup(teacher_tok, student_tok, tx):
    teacher = decoder(teacher_tok.vocab_size, 32, 1, 1, scale=10)
    tg, frozen = freeze_model(teacher)
    g, state = create_train_state(decoder(student_tok.vocab_size, 16, 1, 0), tx, seed=0)
    return teacher, g, state, tg, frozen


def rows(teacher_tok, student_tok, n=4):
    r = aligned_rows(teacher_tok, student_tok, CONVS, max_length=256, teacher_max_length=256)
    t_len = max(len(x) for x in r.teacher_ids)
    s_len = max(len(x) for x in r.student_ids)
    return r, r.batch(range(n), length=s_len, teacher_length=t_len, pad_id=0, teacher_pad_id=0)


def test_on_one_tokenizer_the_hybrid_step_is_the_token_step():
    tok = bpe(400)
    tx = optax.sgd(0.1)
    _, g, state, tg, frozen = setup(tok, tok, tx)
    r, batch = rows(tok, tok)
    assert r.exact == r.spans  # every span is one token on both sides, the same one
    ids = np.arange(tok.vocab_size, dtype=np.int32)
    # with the labels' cross-entropy beside it (one tokenizer: a span per learned token, the same denominators)
    new, m = cross_tokenizer_step(
        state,
        batch,
        CrossTokenizerKD(divergence=ForwardKL(), kd_weight=0.9, ce_weight=0.1, chunk_size=64),
        frozen,
        graphdef=g,
        teacher_graphdef=tg,
        tx=tx,
        shared=(ids, ids),
    )
    plain = {k: batch[k] for k in ("tokens", "loss_mask", "attention_mask")}
    ref, m_ref = token_kd_step(
        state,
        plain,
        TokenKD(divergence=ForwardKL(), kd_weight=0.9, ce_weight=0.1),
        frozen,
        graphdef=g,
        teacher_graphdef=tg,
        tx=tx,
    )
    assert int(m["spans"]) == int(m_ref["tokens"])  # a span per learned token
    np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_across_tokenizers_the_loss_is_the_float64_reference_and_it_learns():
    teacher_tok, student_tok = bpe(600), bpe(300)
    tx = optim._strict_safe(optax.adam(3e-3))  # optax's bias correction mixes int and float
    teacher, g, state, tg, frozen = setup(teacher_tok, student_tok, tx)
    r, batch = rows(teacher_tok, student_tok)
    assert 0 < r.exact < r.spans  # both kinds of span
    t_shared, s_shared = shared_tokens(
        teacher_tok.backend.get_vocab(with_added_tokens=True), student_tok.backend.get_vocab(with_added_tokens=True)
    )
    student = nnx.merge(g, state.params, state.batch_stats, state.rest)
    s_logits = np.asarray(
        student(jnp.asarray(batch["tokens"]), attention_mask=jnp.asarray(batch["attention_mask"])), np.float64
    )
    t_logits = np.asarray(
        teacher(jnp.asarray(batch["teacher_tokens"]), attention_mask=jnp.asarray(batch["teacher_attention_mask"])),
        np.float64,
    )
    # the reference walks each span as the alignment states it: its tokens on each side, in order
    values = []
    for b in range(4):
        lay = r.layouts[b]
        for k in np.flatnonzero(lay.where):

            def merged(logits, ids, first, chain):
                lp = log_softmax64(logits)
                out = lp[first[k]].copy()
                for n in np.flatnonzero(chain == k):
                    out += lp[n, ids[n + 1]]
                return out

            q = merged(s_logits[b], batch["tokens"][b], lay.student_first, lay.student_chain)
            p = merged(t_logits[b], batch["teacher_tokens"][b], lay.teacher_first, lay.teacher_chain)
            if lay.exact[k]:
                p_log = log_softmax64(t_logits[b, lay.teacher_first[k]][t_shared])
                q_log = log_softmax64(s_logits[b, lay.student_first[k]][s_shared])
                values.append(float((np.exp(p_log) * (p_log - q_log)).sum()))
            else:
                values.append(ref_uld(q, p))
    objective = CrossTokenizerKD(divergence=ForwardKL())
    step = jax.jit(
        lambda s, bt: cross_tokenizer_step(
            s, bt, objective, frozen, graphdef=g, teacher_graphdef=tg, tx=tx, shared=(t_shared, s_shared)
        )
    )
    state, m = step(state, batch)
    assert int(m["spans"]) == len(values)
    np.testing.assert_allclose(float(m["loss"]), np.mean(values), rtol=1e-4)
    first = float(m["loss"])
    for _ in range(15):
        state, m = step(state, batch)
    assert float(m["loss"]) < 0.8 * first


def test_bad_batches_and_objectives_are_refused():
    tok = bpe(300)
    tx = optax.sgd(0.1)
    _, g, state, tg, frozen = setup(tok, tok, tx)
    _, batch = rows(tok, tok, n=2)
    with pytest.raises(ValueError, match="needs teacher_tokens"):
        cross_tokenizer_step(
            state,
            {k: v for k, v in batch.items() if k != "teacher_tokens"},
            CrossTokenizerKD(),
            frozen,
            graphdef=g,
            teacher_graphdef=tg,
            tx=tx,
        )
    with pytest.raises(ValueError, match="needs the shared tokens"):
        cross_tokenizer_step(
            state, batch, CrossTokenizerKD(divergence=ForwardKL()), frozen, graphdef=g, teacher_graphdef=tg, tx=tx
        )
    with pytest.raises(ValueError, match="kd_weight and ce_weight are both 0"):
        CrossTokenizerKD(kd_weight=0.0)


@pytest.mark.parametrize("divergence", [ForwardKL(), None], ids=["hybrid", "uld"])
def test_a_stored_teacher_steps_as_the_online_one(tmp_path, divergence):
    """The teacher's span values stored once (top k = the student's vocabulary, bfloat16): the
    step takes no teacher and moves the student as the online step does, for the hybrid (its exact
    spans and its ULD spans) and for ULD alone, whose values are stored without their ids."""
    from jkd.train.lm_cross import store_span_teacher
    from jkd.train.stored import StoredTopK, TeacherOutputMismatch

    teacher_tok, student_tok = bpe(600), bpe(300)
    tx = optax.sgd(0.5)
    teacher, g, state, tg, frozen = setup(teacher_tok, student_tok, tx)
    r = aligned_rows(teacher_tok, student_tok, CONVS, max_length=256)
    shared = shared_tokens(
        teacher_tok.backend.get_vocab(with_added_tokens=True), student_tok.backend.get_vocab(with_added_tokens=True)
    )
    length = max(max(len(x) for x in r.teacher_ids), max(len(x) for x in r.student_ids))
    objective = CrossTokenizerKD(divergence=divergence, ce_weight=0.5, chunk_size=64)
    stored = store_span_teacher(
        tg,
        frozen,
        r,
        objective,
        k=student_tok.vocab_size,
        length=length,
        pad_id=0,
        teacher_pad_id=0,
        shared=shared,
        batch_size=3,
    )
    assert stored.values.shape == (len(r), length - 1, student_tok.vocab_size)
    assert stored.indices.shape == stored.values.shape[:2] + ((student_tok.vocab_size,) if divergence else (0,))
    rows_ = np.array([4, 1, 0, 5])
    batch = {**r.batch(rows_, length=length, teacher_length=length, pad_id=0, teacher_pad_id=0), "index": rows_}
    online, m_online = cross_tokenizer_step(
        state, batch, objective, frozen, graphdef=g, teacher_graphdef=tg, tx=tx, shared=shared
    )
    kept = dataclasses.replace(objective, stored=True)
    new, m = cross_tokenizer_step(
        state, stored.targets(batch), kept, None, graphdef=g, teacher_graphdef=None, tx=tx, shared=shared
    )
    assert int(m["spans"]) == int(m_online["spans"])
    moved = [np.asarray(a - b) for a, b in zip(jax.tree.leaves(online.params), jax.tree.leaves(state.params))]
    for a, e in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        ref = moved.pop(0)
        np.testing.assert_allclose(np.asarray(a - e), ref, atol=2e-2 * float(np.abs(ref).max()) + 1e-7)
    assert float(m["loss"]) <= float(m_online["loss"]) + 1e-6  # less the teacher's mass past k (ULD spans)
    path = tmp_path / "spans.npz"
    stored.save(path)
    again = StoredTopK.load(path)
    np.testing.assert_array_equal(np.asarray(again.values, np.float32), np.asarray(stored.values, np.float32))
    with pytest.raises(TeacherOutputMismatch):  # another row under a stored row's id
        stored.targets({**batch, "index": np.array([5, 1, 0, 4])})
    with pytest.raises(ValueError, match="reads the teacher's span values"):
        cross_tokenizer_step(state, batch, kept, None, graphdef=g, teacher_graphdef=None, tx=tx, shared=shared)
