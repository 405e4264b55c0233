"""Stored top-k teacher outputs for language models: the same step as online distillation when k
is the whole vocabulary, misaligned data refused, storage round trip, learning with small k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd.train import optim
from jkd.train.lm_steps import StoredTopKKD, TokenKD, stored_topk_step, token_kd_step
from jkd.train.stored import StoredTopK, TeacherOutputMismatch, store_sequence_topk, teacher_identity
from tests.train.test_lm_steps import TEACHER, VOCAB, _batch, _setup


def _data(n=16):
    parts = [_batch(seed) for seed in range(n // 8)]
    data = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    data["index"] = np.arange(n)
    return data


def _rows(data, rows):
    return {k: jnp.asarray(v[rows]) for k, v in data.items()}


def test_whole_vocabulary_stored_equals_online_distillation():
    tx = optax.sgd(0.5)
    g, state, tg, frozen = _setup(tx)
    data = _data(8)
    stored = store_sequence_topk(tg, frozen, data, k=VOCAB, vocab_size=VOCAB, batch_size=8)
    batch = stored.targets(_rows(data, np.arange(8)))
    online, m_on = jax.jit(
        lambda s, b: token_kd_step(
            s,
            b,
            TokenKD(vocab_size=VOCAB, ce_weight=0.3, chunk_size=32),
            frozen,
            graphdef=g,
            teacher_graphdef=tg,
            tx=tx,
        )
    )(state, batch)
    offline, m_off = jax.jit(
        lambda s, b: stored_topk_step(s, b, StoredTopKKD(ce_weight=0.3, chunk_size=32), graphdef=g, tx=tx)
    )(state, batch)
    np.testing.assert_allclose(float(m_off["loss"]), float(m_on["loss"]), rtol=1e-2)  # bf16 storage
    for a, b, s0 in zip(jax.tree.leaves(offline.params), jax.tree.leaves(online.params), jax.tree.leaves(state.params)):
        step = np.abs(np.asarray(b) - np.asarray(s0)).max()
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 0.03 * step + 1e-7


def test_changed_or_reordered_data_is_refused(tmp_path):
    _, _, tg, frozen = _setup(optax.sgd(0.1))
    data = _data(16)
    ident = teacher_identity(frozen, TEACHER)
    stored = store_sequence_topk(tg, frozen, data, k=4, batch_size=8, identity=ident)
    stored.targets(_rows(data, np.arange(8)), source=ident)  # fine
    shuffled = _rows(data, np.arange(8))
    shuffled["index"] = shuffled["index"][::-1]
    with pytest.raises(TeacherOutputMismatch, match="examples in this batch are not the ones"):
        stored.targets(shuffled)
    edited = _rows(data, np.arange(8, 16))
    edited["tokens"] = edited["tokens"].at[3, 2].add(1)
    with pytest.raises(TeacherOutputMismatch, match="1 of 8 examples .* example id 11"):
        stored.targets(edited)
    with pytest.raises(TeacherOutputMismatch, match="computed with '[0-9a-f]+', but this step uses 'another'"):
        stored.targets(_rows(data, np.arange(8)), source="another")
    with pytest.raises(TeacherOutputMismatch, match="sequences have 12 tokens, the stored outputs 24"):
        stored.targets({k: v[:, :12] if v.ndim == 2 else v for k, v in _rows(data, np.arange(8)).items()})
    path = tmp_path / "topk.npz"
    stored.save(path)
    back = StoredTopK.load(path)
    assert back.source == ident and back.key == "tokens" and back.values.dtype == jnp.bfloat16
    np.testing.assert_array_equal(back.values.view(np.uint16), stored.values.view(np.uint16))
    np.testing.assert_array_equal(back.indices, stored.indices)
    assert [p.name for p in tmp_path.iterdir()] == ["topk.npz"]


def test_small_k_still_distils():
    tx = optim._strict_safe(optax.adam(3e-3))
    g, state, tg, frozen = _setup(tx)
    data = _data(8)
    stored = store_sequence_topk(tg, frozen, data, k=8, vocab_size=VOCAB, batch_size=8)
    batch = stored.targets(_rows(data, np.arange(8)))
    assert stored.values.shape == (8, 23, 8)
    step = jax.jit(lambda s, b: stored_topk_step(s, b, StoredTopKKD(chunk_size=64), graphdef=g, tx=tx))
    first = None
    for _ in range(40):
        state, m = step(state, batch)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < 0.6 * first
