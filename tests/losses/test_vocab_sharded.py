"""The fused vocabulary losses with the output projections' rows split over the mesh's ``model``
axis (the decoder's rule for ``lm_head``): the value and the gradients equal the one-device loss
for every divergence, the top-k form, masks and labels, and the compiled module never gathers the
whole vocabulary (XLA's partitioner combines per-shard maxima and sums instead). The training step
on a (2, 2) mesh is checked the same way."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jkd import losses
from jkd.models.decoder_sharding import make_mesh
from jkd.train.parallel import all_gather_shapes

V, D_S, D_T, B, T, K = 96, 16, 24, 4, 12, 5


def whole_vocab_gathers(hlo: str) -> list[tuple[int, ...]]:
    """The all-gathers whose result has a dimension of the whole vocabulary."""
    return [s for s in all_gather_shapes(hlo) if V in s]


def test_all_gather_shapes_reads_both_forms():
    text = (
        "  %ag = f32[8,96]{1,0} all-gather(f32[4,96]{1,0} %p), dimensions={0}\n"
        "  %s = (f32[4,48]{1,0}, f32[8,48]{1,0}) all-gather-start(f32[4,48]{1,0} %q)\n"
        "  %r = f32[96]{0} all-reduce(f32[96]{0} %x)\n"
    )
    assert all_gather_shapes(text) == [(8, 96), (4, 48), (8, 48)]


def _inputs():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    where = jnp.asarray(rng.random((B, T)) < 0.7)
    values = jnp.asarray(-np.sort(rng.random((B, T, K)) * 4, axis=-1), jnp.float32)
    ids = jnp.asarray(np.stack([rng.permutation(V)[:K] for _ in range(B * T)]).reshape(B, T, K), jnp.int32)
    return dict(
        hs=f(B, T, D_S),
        ws=0.5 * f(V, D_S),
        ht=f(B, T, D_T),
        wt=0.5 * f(V, D_T),
        where=where,
        labels=jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        values=values,
        ids=ids,
    )


DIVERGENCES = [
    losses.ForwardKL(),
    losses.ReverseKL(),
    losses.GeneralizedJSD(beta=0.3),
    losses.SkewForwardKL(alpha=0.1),
    losses.SkewReverseKL(alpha=0.1),
    losses.TotalVariation(),
]


def _check(fn, args, specs, mesh):
    grad = jax.value_and_grad(fn, argnums=(0, 1))
    want = jax.jit(grad)(*args)
    shardings = tuple(NamedSharding(mesh, s) for s in specs)
    sharded = jax.jit(grad, in_shardings=shardings)
    placed = [jax.device_put(a, s) for a, s in zip(args, shardings)]
    got = sharded(*placed)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    assert got[1][1].sharding.spec[0] == "model"  # the weight's gradient stays split by rows
    assert whole_vocab_gathers(sharded.lower(*placed).compile().as_text()) == []


@pytest.mark.parametrize("shape", [(2, 2), (1, 4)])
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=lambda d: type(d).__name__)
def test_dense_teacher_with_the_vocabulary_split(shape, divergence):
    x = _inputs()

    def loss(hs, ws, ht, wt):
        return losses.projected_token_divergence(
            hs,
            ws,
            ht,
            wt,
            divergence=divergence,
            temperature=2.0,
            where=x["where"],
            labels=x["labels"],
            divergence_weight=0.7,
            label_weight=0.3,
            chunk_size=16,
        )

    rows = P("model", "data") if shape[0] > 1 else P("model", None)
    _check(loss, (x["hs"], x["ws"], x["ht"], x["wt"]), (P("data"), rows, P("data"), rows), make_mesh(*shape))


@pytest.mark.parametrize("shape", [(2, 2), (1, 4)])
def test_top_k_teacher_with_the_vocabulary_split(shape):
    x = _inputs()

    def loss(hs, ws):
        return losses.projected_topk_kl(
            hs,
            ws,
            x["values"],
            x["ids"],
            temperature=1.5,
            where=x["where"],
            labels=x["labels"],
            label_weight=0.2,
            chunk_size=16,
        )

    rows = P("model", "data") if shape[0] > 1 else P("model", None)
    _check(loss, (x["hs"], x["ws"]), (P("data"), rows), make_mesh(*shape))


def test_the_training_step_on_a_2x2_mesh_never_gathers_the_vocabulary():
    import optax
    from flax import nnx

    from jkd.models.decoder import Decoder
    from jkd.models.decoder_config import DecoderConfig
    from jkd.models.decoder_sharding import tree_shardings
    from jkd.train import parallel
    from jkd.train.lm_steps import TokenKD, token_kd_step
    from jkd.train.state import create_train_state, freeze_model

    def config(hidden, layers):
        return DecoderConfig(
            vocab_size=V,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=64,
            tie_embeddings=False,
        )

    tg, frozen = freeze_model(Decoder(config(32, 2), rngs=nnx.Rngs(1)))
    tx = optax.sgd(0.1)
    g, state = create_train_state(Decoder(config(16, 1), rngs=nnx.Rngs(0)), tx, seed=0)
    step = functools.partial(token_kd_step, graphdef=g, teacher_graphdef=tg, tx=tx)
    run = parallel.on_mesh(step, make_mesh(2, 2), shardings=tree_shardings)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, V, (8, 20)).astype(np.int32),
        "loss_mask": rng.random((8, 20)) < 0.8,
        "attention_mask": np.ones((8, 20), bool),
    }
    state, frozen = run.place(state), run.place_frozen(frozen)
    objective = TokenKD(divergence=losses.GeneralizedJSD(beta=0.5), ce_weight=0.5, chunk_size=32)
    new, metrics = run(state, batch, objective, frozen)
    assert np.isfinite(float(metrics["loss"]))
    hlo = run.lower(new, batch, objective, frozen).compile().as_text()
    assert "all-gather" in hlo  # the module is partitioned (the check below is not vacuous)
    assert whole_vocab_gathers(hlo) == []
