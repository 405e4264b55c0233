"""The decoder against ``transformers`` (the reference implementation), checkpoints in and out,
and the errors on bad folders."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jkd.models import hf
from jkd.models import safetensors_io as st
from jkd.models.decoder import Decoder
from jkd.models.decoder_config import UnsupportedConfigError, from_hf_config
from tests.lm_reference import build_hf_model, hf_classes, hf_logits, padded_batch

torch = pytest.importorskip("torch")
FAMS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (transformers model, its folder)"""
    out = {}
    for fam in FAMS:
        folder = tmp_path_factory.mktemp(fam)
        out[fam] = (build_hf_model(fam, folder), folder)
    return out


def _jkd_logits(model, tokens, mask):
    return np.asarray(model(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize("fam", FAMS)
def test_logits_match_transformers_with_padding(saved, fam):
    ref_model, folder = saved[fam]
    model = hf.load_hf(folder)
    tokens, mask, pos = padded_batch(model.config.vocab_size)
    ref = hf_logits(ref_model, tokens, mask, pos)
    out = _jkd_logits(model, tokens, mask)
    assert np.abs(out - ref)[mask].max() <= 1e-4
    assert np.abs(ref).max() > 0.5  # not a degenerate comparison


@pytest.mark.parametrize("fam", ("llama", "qwen3"))
def test_rows_longer_than_an_attention_block_match_transformers(saved, fam):
    """Rows of 150 tokens run the causal attention in blocks of 64 query rows (the last one
    shorter); full, right-padded and left-padded rows against transformers."""
    from jkd.models.decoder import CAUSAL_BLOCK, causal_block

    assert causal_block(150) == CAUSAL_BLOCK == 64
    ref_model, folder = saved[fam]
    model = hf.load_hf(folder)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, model.config.vocab_size, (3, 150))
    mask = np.ones((3, 150), bool)
    mask[1, 100:] = False
    mask[2, :70] = False
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = hf_logits(ref_model, tokens, mask, pos)
    assert np.abs(_jkd_logits(model, tokens, mask) - ref)[mask].max() <= 1e-4


def test_llama3_rope_scaling_is_what_makes_llama_match(saved):
    """The same weights without the Llama 3 frequency scaling are clearly off: the comparison
    above can fail."""
    ref_model, folder = saved["llama"]
    model = hf.load_hf(folder)
    assert model.config.rope_scaling is not None
    plain = Decoder(dataclasses.replace(model.config, rope_scaling=None), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(model))
    tokens, mask, pos = padded_batch(model.config.vocab_size)
    ref = hf_logits(ref_model, tokens, mask, pos)
    assert np.abs(_jkd_logits(plain, tokens, mask) - ref)[mask].max() > 1e-2


def test_family_features_are_present(saved):
    cfgs = {f: hf.load_hf(saved[f][1]).config for f in FAMS}
    assert cfgs["qwen2"].tie_embeddings and cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 24
    assert cfgs["llama"].rope_scaling.factor == 8.0 and not cfgs["llama"].tie_embeddings
    assert hf.load_hf(saved["qwen2"][1]).lm_head is None


def test_packed_sequences_equal_separate_sequences(saved):
    """Two conversations packed in one row (segment ids, positions restarting) give each one's
    logits as transformers computes them alone."""
    ref_model, folder = saved["qwen3"]
    model = hf.load_hf(folder)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 128, 9), rng.integers(0, 128, 7)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 9 + [2] * 7 + [0, 0]])
    out = np.asarray(
        model(jnp.asarray(packed, jnp.int32), segment_ids=jnp.asarray(seg), attention_mask=jnp.asarray(seg > 0))
    )
    for seq, sl in ((a, slice(0, 9)), (b, slice(9, 16))):
        n = len(seq)
        ref = hf_logits(ref_model, seq[None], np.ones((1, n), bool), np.arange(n)[None])
        assert np.abs(out[0, sl] - ref[0]).max() <= 1e-4


@pytest.mark.parametrize("fam", ("llama", "qwen2"))
def test_saved_folder_loads_in_transformers_with_the_same_logits(saved, fam, tmp_path):
    ref_model, folder = saved[fam]
    model = hf.load_hf(folder)
    out = hf.save_hf(model, tmp_path / "out", max_shard_bytes=60_000)  # several shards + index
    index = json.loads((out / hf.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, model_cls = hf_classes(fam)
    again = model_cls.from_pretrained(out).eval()
    tokens, mask, pos = padded_batch(128, seed=3)
    ref = hf_logits(ref_model, tokens, mask, pos)
    assert np.abs(hf_logits(again, tokens, mask, pos) - ref)[mask].max() <= 1e-5
    # ... and jkd reads its own shards back to the same parameters.
    back = hf.load_hf(out)
    for x, y in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_load(saved):
    ref_model, folder = saved["qwen3"]
    model = hf.load_hf(folder, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
    tokens, mask, pos = padded_batch(128)
    ref = hf_logits(ref_model, tokens, mask, pos)
    out = _jkd_logits(model, tokens, mask)
    assert out.dtype == np.float32
    err = np.abs(out - ref)[mask]
    assert err.max() < 0.15 and err.mean() < 0.03  # bfloat16 rounding, not a wrong model


def test_reader_agrees_with_the_safetensors_package(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.randn(7, dtype=torch.float16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    infos, _ = st.read_header(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        got = st.read_tensor(infos[name])
        np.testing.assert_array_equal(got.astype(np.float64), t.double().numpy())


def test_writer_is_read_by_the_safetensors_package(tmp_path):
    from safetensors.numpy import load_file

    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "v": np.ones(5, np.float16)}
    st.write_file(tmp_path / "y.safetensors", [(k, v.shape, v.dtype) for k, v in arrays.items()], arrays.__getitem__)
    back = load_file(tmp_path / "y.safetensors")
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)


# ---- bad input ------------------------------------------------------------------------------


def _copy(saved, fam, tmp_path):
    dst = tmp_path / fam
    shutil.copytree(saved[fam][1], dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json.*model.safetensors"):
        hf.load_hf(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type 'gpt2'.*llama, qwen2, qwen3"),
        (dict(use_sliding_window=True), "use_sliding_window=True"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope_type 'yarn'"),
        (dict(moe_num_experts=8), "moe_num_experts=8 \\(a mixture of experts"),
        (dict(num_experts=8), "num_experts=8 \\(a mixture of experts"),
        (dict(rope_interleaved=True), "rope_interleaved=True \\(supported: False\\)"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "sliding_attention"),
    ],
)
def test_unsupported_config_fields_are_named(saved, tmp_path, change, message):
    folder = _copy(saved, "qwen3", tmp_path)
    _edit_config(folder, **change)
    with pytest.raises(UnsupportedConfigError, match=message) as e:
        hf.load_hf(folder)
    assert str(e.value).startswith(f"{folder}/config.json")  # which folder's config, not "config.json" alone


def test_unknown_keys_load_with_one_warning_and_generation_ends_are_read(saved, tmp_path):
    """Keys jkd does not know (those of SmolLM2's published configs among them) are named in one
    warning and loading goes on, with the same logits; generation_config.json's end tokens count."""
    from jkd.models.decoder_config import ConfigWarning

    folder = _copy(saved, "llama", tmp_path)
    before = np.asarray(hf.load_hf(folder)(jnp.asarray([[3, 5, 7, 9]])))
    _edit_config(
        folder, is_llama_config=True, rope_interleaved=False, unk_token_id=0, _model_name_or_path="x", eos_token_id=None
    )
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5], "bos_token_id": 1}))
    with pytest.warns(
        ConfigWarning,
        match=r"unknown to jkd: is_llama_config=True; _model_name_or_path='x' "
        r"\(transformers' llama model does not read them either\)",
    ) as caught:
        model = hf.load_hf(folder)
    assert len(caught) == 1
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray([[3, 5, 7, 9]]))), before)
    assert model.config.eos_token_ids == (2, 5)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.warns(ConfigWarning), pytest.raises(ValueError, match="must be token ids below the vocabulary"):
        hf.load_hf(folder)


def test_tensor_shapes_that_do_not_match_the_config(saved, tmp_path):
    folder = _copy(saved, "llama", tmp_path)
    _edit_config(folder, intermediate_size=80)
    with pytest.raises(hf.CheckpointMismatchError, match=r"mlp.down_proj.weight is \[64, 96\], config says \[64, 80\]"):
        hf.load_hf(folder)


def test_missing_and_extra_tensors(saved, tmp_path):
    folder = _copy(saved, "llama", tmp_path)
    _edit_config(folder, num_hidden_layers=3)
    with pytest.raises(hf.CheckpointMismatchError, match=r"missing, e.g. \['model.layers.2"):
        hf.load_hf(folder)
    _edit_config(folder, num_hidden_layers=1)
    with pytest.raises(
        hf.CheckpointMismatchError, match=r"not in a llama model of this config, e.g. \['model.layers.1"
    ):
        hf.load_hf(folder)


def test_truncated_safetensors(saved, tmp_path):
    folder = _copy(saved, "qwen2", tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(st.SafetensorsError, match="truncated"):
        hf.load_hf(folder)


def test_missing_shard(saved, tmp_path):
    model = hf.load_hf(saved["qwen2"][1])
    out = hf.save_hf(model, tmp_path / "m", max_shard_bytes=60_000)
    second = sorted(out.glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing.*{second.name}"):
        hf.load_hf(out)


def test_token_ids_outside_the_vocabulary(saved):
    model = hf.load_hf(saved["qwen2"][1])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 128\), e.g. 128"):
        model(jnp.array([[1, 128]], jnp.int32))


def test_save_refuses_a_non_empty_folder_and_leaves_nothing_half_written(saved, tmp_path, monkeypatch):
    model = hf.load_hf(saved["qwen2"][1])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        hf.save_hf(model, tmp_path / "taken")
    calls = []

    def failing_write(path, tensors, fetch, metadata=None):
        calls.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "write_file", failing_write)
    with pytest.raises(OSError):
        hf.save_hf(model, tmp_path / "new")
    assert calls and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_unknown_fields_in_a_config_dict_are_refused_before_any_file_is_read():
    cfg = json.loads(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 8,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "quantization_config": {"quant_method": "gptq"},
            }
        )
    )
    with pytest.raises(UnsupportedConfigError, match="quantization_config"):
        from_hf_config(cfg)
