"""The fit loop drives a language-model step on a ('data', 'model') mesh with the decoders sharded
(the students' state and the teacher by the decoder's rules): it ends where one device does, its
state stays sharded, and an interrupted run resumes from a sharded checkpoint onto another mesh."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from jkd.models.decoder_sharding import make_mesh, tree_shardings
from jkd.train import parallel
from jkd.train.checkpoint import Checkpoints
from jkd.train.lm_steps import TokenKD, token_kd_step
from jkd.train.loop import LoopConfig, fit
from tests.train.test_lm_steps import VOCAB, _batch, _setup


def _stream(start):
    for i in range(start, 100):
        yield {k: np.asarray(v) for k, v in _batch(seed=i).items()}


def _fit(run, state, frozen, steps, checkpoints=None):
    objective = TokenKD(vocab_size=VOCAB, ce_weight=0.2, chunk_size=32)
    return fit(
        run,
        state,
        objective,
        frozen,
        batches=_stream,
        checkpoints=checkpoints,
        config=LoopConfig(num_steps=steps, save_every=2, progress=False),
    )


def test_sharded_fit_equals_one_device_and_resumes_on_another_mesh(tmp_path):
    tx = optax.sgd(0.3, momentum=0.9)
    g, _, tg, frozen = _setup(tx)
    step = functools.partial(token_kd_step, graphdef=g, teacher_graphdef=tg, tx=tx)

    def fresh():  # the same initial state again (the runners donate theirs)
        return _setup(tx)[1]

    one, _ = _fit(parallel.single_device(step), fresh(), frozen, 4)

    mesh = make_mesh(2, 2)
    sharded, _ = _fit(parallel.on_mesh(step, mesh, shardings=tree_shardings), fresh(), frozen, 4)
    q = sharded.params["layers"][0]["self_attn"]["q_proj"]["weight"][...]
    assert tuple(q.sharding.spec) == ("model", "data")  # the state stayed sharded through the loop
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)

    # 2 steps on (2, 2), checkpointed; then the run goes on to 4 steps on (4, 1) from the checkpoint
    first = Checkpoints(tmp_path / "ckpt", async_save=False)
    _fit(parallel.on_mesh(step, mesh, shardings=tree_shardings), fresh(), frozen, 2, first)
    first.close()
    again = Checkpoints(tmp_path / "ckpt", async_save=False)
    resumed, history = _fit(
        parallel.on_mesh(step, make_mesh(4, 1), shardings=tree_shardings), fresh(), frozen, 4, again
    )
    again.close()
    assert history[0] == {"event": "resumed", "step": 2}
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_remat_and_micro_batches_give_the_same_step():
    """Activation checkpointing per block recomputes, it does not change the step; 4 micro-batches
    of gradient accumulation give the step of the whole batch."""
    from flax import nnx

    from jkd.models.decoder import Decoder, set_remat
    from jkd.train.state import create_train_state
    from tests.train.test_lm_steps import STUDENT

    tx = optax.sgd(0.3)
    g, state, tg, frozen = _setup(tx)
    objective = TokenKD(vocab_size=VOCAB, ce_weight=0.2, chunk_size=32)
    batch = _batch(0)
    plain, m0 = jax.jit(functools.partial(token_kd_step, graphdef=g, teacher_graphdef=tg, tx=tx))(
        state, batch, objective, frozen
    )
    gr, st = create_train_state(set_remat(Decoder(STUDENT, rngs=nnx.Rngs(0))), tx, seed=0)
    assert gr != g  # the recomputation is part of the compiled program
    for graphdef, s, micro in (
        (gr, st, 1),
        (g, _setup(tx)[1], 4),
        (gr, create_train_state(set_remat(Decoder(STUDENT, rngs=nnx.Rngs(0))), tx, seed=0)[1], 4),
    ):
        step = jax.jit(
            functools.partial(token_kd_step, graphdef=graphdef, teacher_graphdef=tg, tx=tx, micro_batches=micro)
        )
        other, m = step(s, batch, objective, frozen)
        np.testing.assert_allclose(float(m["loss"]), float(m0["loss"]), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(other.params)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)
