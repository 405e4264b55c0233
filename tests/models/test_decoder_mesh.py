"""The decoder sharded over a ('data', 'model') mesh of 4 (in process) and 8 (subprocess) CPU
devices: the 1-device logits, 1/N of every matrix per device, sharded loading, generation and
train-state checkpoints restored onto another mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jkd.models import hf
from jkd.models.decoder import Decoder
from jkd.models.decoder_config import DecoderConfig
from jkd.models.decoder_sharding import batch_sharding, decoder_shardings, make_mesh, shard_decoder
from jkd.train.checkpoint import Checkpoints
from jkd.models.sampler import generate
from jkd.train.state import create_train_state

# Every side divisible by 4 (and by 8 where the 8-device mesh splits it).
CONFIG = DecoderConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    family="qwen2",
    max_position_embeddings=128,
)


def _tokens(batch: int = 4):
    return jnp.asarray(np.random.default_rng(0).integers(0, 64, (batch, 12)), jnp.int32)


@jax.jit
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _matrices(model):
    return [(path, v[...]) for path, v in nnx.to_flat_state(nnx.state(model)) if v[...].ndim == 2]


@pytest.mark.parametrize("shape", [(2, 2), (4, 1), (1, 4)])
def test_sharded_logits_equal_one_device_and_each_device_holds_a_quarter(shape):
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    ref = np.asarray(model(_tokens()))
    mesh = make_mesh(*shape)
    shard_decoder(model, mesh)
    for path, w in _matrices(model):
        shards = w.addressable_shards
        assert len(shards) == 4
        assert all(s.data.size * 4 == w.size for s in shards), (path, w.sharding)
    out = _forward(*nnx.split(model), jax.device_put(_tokens(), batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_generation_on_a_sharded_model_equals_one_device():
    model = Decoder(CONFIG, rngs=nnx.Rngs(1))
    nnx.update(model, jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, nnx.state(model)))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    ref = generate(model, prompts, max_new_tokens=8)
    shard_decoder(model, make_mesh(2, 2))
    out = generate(model, prompts, max_new_tokens=8)
    np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_load_hf_places_each_tensor_with_its_sharding(tmp_path):
    pytest.importorskip("torch")
    from tests.lm_reference import build_hf_model

    build_hf_model(
        "qwen2",
        tmp_path,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    plain = hf.load_hf(tmp_path)
    mesh = make_mesh(2, 2)
    sharded = hf.load_hf(tmp_path, mesh=mesh)
    want = decoder_shardings(nnx.state(plain), mesh)
    for (path, v), (_, s) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(want)):
        assert v[...].sharding.is_equivalent_to(s.get_raw_value(), v[...].ndim), path
    np.testing.assert_allclose(
        np.asarray(_forward(*nnx.split(sharded), _tokens())), np.asarray(plain(_tokens())), atol=1e-5, rtol=0
    )


def test_train_state_checkpoint_restores_onto_another_mesh(tmp_path):
    model = shard_decoder(Decoder(CONFIG, rngs=nnx.Rngs(2)), make_mesh(2, 2))
    tx = optax.adamw(1e-3)
    graphdef, state = create_train_state(model, tx, seed=0)
    state = state.replace(step=jnp.asarray(7, jnp.int32))
    ckpt = Checkpoints(tmp_path / "ckpt", async_save=False)
    ckpt.save(7, state, meta={"step": 7})
    ckpt.wait()

    other = make_mesh(1, 4)
    target_model = shard_decoder(Decoder(CONFIG, rngs=nnx.Rngs(99)), other)
    _, target = create_train_state(target_model, tx, seed=1)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    restored, meta = Checkpoints(tmp_path / "ckpt").restore(abstract)
    assert meta["step"] == 7 and int(restored.step) == 7
    w = restored.params["layers"][0]["mlp"]["up_proj"]["weight"][...]
    assert w.sharding.mesh.shape == other.shape
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_EIGHT = textwrap.dedent("""
    import json, jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp, numpy as np
    from flax import nnx
    from jkd.models.decoder import Decoder
    from jkd.models.decoder_sharding import make_mesh, shard_decoder, batch_sharding
    from tests.models.test_decoder_mesh import CONFIG, _tokens, _forward, _matrices
    out = {}
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    ref = np.asarray(model(_tokens(8)))
    for shape in [(2, 4), (8, 1)]:
        m = Decoder(CONFIG, rngs=nnx.Rngs(0))
        mesh = make_mesh(*shape)
        shard_decoder(m, mesh)
        fractions = sorted({s.data.size / w.size for _, w in _matrices(m) for s in w.addressable_shards})
        y = _forward(*nnx.split(m), jax.device_put(_tokens(8), batch_sharding(mesh)))
        out[str(shape)] = {"devices": len(jax.devices()), "fractions": fractions,
                           "err": float(np.abs(np.asarray(y) - ref).max())}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_eight_devices():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", _EIGHT], capture_output=True, text=True, env=env, cwd=root, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for shape, r in res.items():
        assert r["devices"] == 8
        assert r["err"] <= 1e-5, (shape, r)
        assert r["fractions"] == [1 / 8], (shape, r)
