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
