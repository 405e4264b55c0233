"""llama.cpp's block quantizations in JAX against the gguf package's reference quantizers (bit for
bit), the straight-through gradient, and a fake-quantized decoder against its GGUF file read back
by transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")

from jkd.compress.gguf_blocks import fake_quantize, q4_0, q8_0, tensor_type  # noqa: E402


def reference(x: np.ndarray, kind: str) -> np.ndarray:
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)


def weights(seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(6, 128)) * rng.uniform(0.01, 3, size=(6, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = np.linspace(-1, 1, 32)  # halves exactly on the grid: rounding ties
    x[2, 32:64] = -x[2, 32:64].max()  # the largest magnitude shared by several, negative
    return x


@pytest.mark.parametrize("kind, fn", [("Q8_0", q8_0), ("Q4_0", q4_0)])
def test_block_quantizers_equal_llama_cpps_bit_for_bit(kind, fn):
    for seed in range(3):
        x = weights(seed)
        np.testing.assert_array_equal(np.asarray(jax.jit(fn)(x)), reference(x, kind))


def test_the_gradient_passes_straight_through():
    """QAT's rule: the gradient of the float weights is the gradient of the read-back ones."""
    from tests.models.test_gguf_io import model

    _, params, _ = nnx.split(model("llama"), nnx.Param, ...)
    leaves = jax.tree.leaves(params)
    cs = [jnp.asarray(np.random.default_rng(i).normal(size=x.shape), jnp.float32) for i, x in enumerate(leaves)]

    def loss(p):
        return sum(jnp.sum(c * x) for c, x in zip(cs, jax.tree.leaves(fake_quantize(p, "q4_0"))))

    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(fake_quantize(params, "q4_0")), leaves)
    ]
    assert max(moved) > 1e-3  # the forward pass does see quantized weights
    for g, c in zip(jax.tree.leaves(jax.grad(loss)(params)), cs):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


def test_tensor_types_follow_the_export_rule():
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0") == "F32"
    assert tensor_type("blk.0.ffn_up.weight", (128, 64), "q4_0") == "Q4_0"
    assert tensor_type("token_embd.weight", (416, 64), "q4_0") == "Q8_0"
    assert tensor_type("blk.0.ffn_down.weight", (64, 100), "q8_0") == "F16"  # rows not whole blocks
    with pytest.raises(ValueError, match="unknown GGUF quantization 'q3'"):
        tensor_type("x", (32, 32), "q3")


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_a_fake_quantized_decoder_computes_what_its_gguf_file_does(quant, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jkd.models.gguf_io import write_gguf
    from tests.models.test_gguf_io import TOK, model, padded_chats

    m = model("qwen2", seed=2)
    path = write_gguf(m, TOK, tmp_path / f"m.{quant}.gguf", quant=quant)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    fake = nnx.merge(graphdef, fake_quantize(params, quant), rest)
    tokens, mask = padded_chats()
    ours = np.asarray(fake(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask)))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = back(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    plain = np.asarray(m(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask)))
    gap = np.abs(plain[mask] - theirs[mask]).max()  # what quantization moves
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=max(1e-4, 0.01 * gap))
    assert gap > 1e-3
