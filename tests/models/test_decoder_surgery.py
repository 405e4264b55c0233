"""A decoder cut from a larger one equals transformers' model with the same blocks removed."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jkd.models import hf
from jkd.models.decoder_surgery import select_layers
from tests.lm_reference import build_hf_model, hf_logits, padded_batch

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("family, layers", [("llama", (0, 3)), ("qwen2", (2, 0)), ("qwen3", (1,))])
def test_selected_layers_match_transformers_with_the_others_deleted(tmp_path, family, layers):
    ref = build_hf_model(family, tmp_path, num_hidden_layers=4)
    teacher = hf.load_hf(tmp_path)
    student = select_layers(teacher, layers)
    assert student.config.num_layers == len(layers) and teacher.config.num_layers == 4
    # the reference: transformers' own model, its decoder blocks kept in the same order
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in layers])
    ref.config.num_hidden_layers = len(layers)
    for new, block in enumerate(ref.model.layers):
        block.self_attn.layer_idx = new
    tokens, mask, pos = padded_batch(teacher.config.vocab_size)
    want = hf_logits(ref, tokens, mask, pos)
    got = np.asarray(student(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - want)[mask].max() <= 1e-4
    full = np.asarray(teacher(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask)))
    assert np.abs(full - want)[mask].max() > 1e-2  # the blocks removed mattered: the check can fail


def test_the_teacher_is_left_alone_and_bad_indices_are_refused(tmp_path):
    build_hf_model("llama", tmp_path, num_hidden_layers=4)
    teacher = hf.load_hf(tmp_path)
    before = np.asarray(teacher.layers[0].self_attn.q_proj.weight[...]).copy()
    student = select_layers(teacher, (0, 3))
    student.layers[0].self_attn.q_proj.weight[...] = 0.0
    np.testing.assert_array_equal(np.asarray(teacher.layers[0].self_attn.q_proj.weight[...]), before)
    for bad in [(), (4,), (1, 1), (-1,)]:
        with pytest.raises(ValueError, match=r"distinct indices in \[0, 4\)"):
            select_layers(teacher, bad)


def _hooked_inputs(ref, tokens, mask, pos):
    """transformers' own model, with hooks recording what each layer's down_proj and o_proj read."""
    seen = {}

    def record(name):
        def hook(module, args, out):  # returns None: the output stays the module's
            seen[name] = args[0].detach()

        return hook

    hooks = [
        m.register_forward_hook(record(name))
        for name, m in ref.named_modules()
        if name.endswith(("mlp.down_proj", "self_attn.o_proj"))
    ]
    hf_logits(ref, tokens, mask, pos)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_width_importance_and_pruning_against_transformers(tmp_path, family):
    """Importance: each MLP channel's mean |input of down_proj| and each key/value group's mean L2
    norm of its heads' part of o_proj's input, over real tokens, as hooks on transformers' model
    see them. Pruning: the narrower model's logits equal transformers' model whose dropped channels
    and heads are zeroed in down_proj and o_proj; saved, transformers loads it with the same logits."""
    from jkd.models.decoder_surgery import prune_width, width_importance

    ref = build_hf_model(family, tmp_path / "full", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = hf.load_hf(tmp_path / "full")
    cfg = model.config
    tokens, mask, pos = padded_batch(cfg.vocab_size)
    mlp, kv = width_importance(model, tokens, attention_mask=mask)
    seen = _hooked_inputs(ref, tokens, mask, pos)
    group, hd = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    for i in range(cfg.num_layers):
        down = seen[f"model.layers.{i}.mlp.down_proj"].double().numpy()[mask]
        np.testing.assert_allclose(mlp[i], np.abs(down).mean(0), rtol=1e-4)
        heads = (
            seen[f"model.layers.{i}.self_attn.o_proj"].double().numpy()[mask].reshape(-1, cfg.num_kv_heads, group, hd)
        )
        np.testing.assert_allclose(kv[i], np.linalg.norm(heads, axis=-1).sum(-1).mean(0), rtol=1e-4)
    small = prune_width(model, (mlp, kv), intermediate_size=cfg.intermediate_size // 2, num_kv_heads=1)
    assert (
        small.config.intermediate_size,
        small.config.num_kv_heads,
        small.config.num_heads,
        small.config.head_dim,
    ) == (cfg.intermediate_size // 2, 1, group, hd)
    with torch.no_grad():  # the reference: the dropped units zeroed where their outputs are read
        for i, layer in enumerate(ref.model.layers):
            dropped_f = np.argsort(-mlp[i], kind="stable")[cfg.intermediate_size // 2 :]
            layer.mlp.down_proj.weight[:, torch.tensor(dropped_f)] = 0
            dropped_g = np.argsort(-kv[i], kind="stable")[1:]
            cols = [c for k in dropped_g for c in range(k * group * hd, (k + 1) * group * hd)]
            layer.self_attn.o_proj.weight[:, torch.tensor(cols)] = 0
    want = hf_logits(ref, tokens, mask, pos)
    got = np.asarray(small(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - want)[mask].max() <= 1e-4
    full = np.asarray(model(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask)))
    assert np.abs(full - want)[mask].max() > 1e-3  # the pruned units mattered: the check can fail
    hf.save_hf(small, tmp_path / "small")
    loaded = __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert np.abs(hf_logits(loaded, tokens, mask, pos) - got)[mask].max() <= 1e-4


def test_width_pruning_keeps_everything_on_request_and_refuses_bad_sizes(tmp_path):
    from jkd.models.decoder_surgery import prune_width, width_importance

    build_hf_model("llama", tmp_path, num_hidden_layers=2)
    model = hf.load_hf(tmp_path)
    tokens, mask, _ = padded_batch(model.config.vocab_size)
    importance = width_importance(model, tokens, attention_mask=mask)
    same = prune_width(model, importance)
    x = jnp.asarray(tokens, jnp.int32)
    np.testing.assert_array_equal(np.asarray(same(x)), np.asarray(model(x)))
    assert model.layers[0].mlp.down_proj.__class__.__name__ == "Linear"  # the calibration taps are removed
    with pytest.raises(ValueError, match=r"intermediate_size must lie in \[1, 96\]"):
        prune_width(model, importance, intermediate_size=97)
    with pytest.raises(ValueError, match="does not fit this model"):
        prune_width(model, (importance[0][:1], importance[1]))
