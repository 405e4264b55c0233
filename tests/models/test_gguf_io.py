"""GGUF export read back by an independent reader, ``transformers`` (``gguf_file=``, which follows
llama.cpp's layout): the logits of each family on padded chat batches, the cross-entropy at q8_0,
the tensor types of each quantization, the tokenizer and chat template, and what is refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from jkd.data import toolchat  # noqa: E402
from jkd.data.chat import encode_chat, render_chat  # noqa: E402
from jkd.data.tokenizer import byte_tokenizer, train_bpe_tokenizer  # noqa: E402
from jkd.models.decoder import Decoder  # noqa: E402
from jkd.models.decoder_config import DecoderConfig, Llama3RopeScaling  # noqa: E402
from jkd.models.gguf_io import GGUFExportError, rope_pairs_order, write_gguf  # noqa: E402

CONVS = toolchat.generate_split("train", 40, seed=0)
TOK = train_bpe_tokenizer(
    [render_chat(byte_tokenizer(), c["messages"], tools=c.get("tools")) for c in CONVS],
    vocab_size=400,
    split_digits=True,
)
FAMILIES = {
    "llama": dict(family="llama", tie_embeddings=True),
    "qwen2": dict(family="qwen2"),  # q/k/v biases, its own head
    "qwen3": dict(family="qwen3", head_dim=128),  # q/k norms (transformers reads Qwen3 GGUFs as head_dim 128)
}


def model(family: str, seed: int = 0) -> Decoder:
    cfg = DecoderConfig(
        vocab_size=416,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
        eos_token_id=TOK.eos_id,
        **FAMILIES[family],
    )
    m = Decoder(cfg, rngs=nnx.Rngs(seed))
    # biases and norms away from their initial 0 / 1, so that a misplaced one shows
    nnx.update(
        m,
        jax.tree.map(
            lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)) if x.ndim == 1 else x,
            nnx.state(m, nnx.Param),
        ),
    )
    return m


def padded_chats(n=3):
    rows = [encode_chat(TOK, c["messages"], tools=c.get("tools")).ids[:160] for c in CONVS[:n]]
    width = max(map(len, rows))
    tokens = np.zeros((n, width), np.int64)
    mask = np.zeros((n, width), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    return tokens, mask


def read_back(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def both_logits(m, path):
    tokens, mask = padded_chats()
    ours = np.asarray(m(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        theirs = read_back(path)(
            torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))
        ).logits.numpy()
    return ours, theirs, tokens, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_f16_logits_read_back_by_transformers(family, tmp_path):
    m = model(family)
    path = write_gguf(m, TOK, tmp_path / f"{family}.gguf", quant="f16")
    ours, theirs, _, mask = both_logits(m, path)
    np.testing.assert_allclose(theirs[mask][:, : TOK.vocab_size], ours[mask][:, : TOK.vocab_size], atol=1e-2)
    assert np.abs(ours[mask]).max() > 0.3  # logits of a size where a misplaced tensor would show


def cross_entropy(logits, tokens, mask):
    lp = (
        logits[:, :-1]
        - np.log(np.exp(logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits[:, :-1].max(-1, keepdims=True)
    )
    nll = -np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
    return float(nll[mask[:, 1:]].mean())


def test_q8_0_keeps_the_cross_entropy_and_q4_0_types(tmp_path):
    m = model("llama", seed=1)
    nnx.update(m, jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, nnx.state(m, nnx.Param)))  # peaked
    path = write_gguf(m, TOK, tmp_path / "q8.gguf", quant="q8_0")
    ours, theirs, tokens, mask = both_logits(m, path)
    ce, ce_q8 = cross_entropy(ours, tokens, mask), cross_entropy(theirs, tokens, mask)
    assert abs(ce_q8 - ce) <= 0.01 * ce, (ce, ce_q8)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied: no head of its own
    q4 = gguf.GGUFReader(write_gguf(m, TOK, tmp_path / "q4.gguf", quant="q4_0"))
    types = {t.name: t.tensor_type.name for t in q4.tensors}
    assert types["blk.1.ffn_down.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert (tmp_path / "q4.gguf").stat().st_size < 0.7 * (tmp_path / "q8.gguf").stat().st_size


def test_the_tokenizer_and_template_read_back(tmp_path):
    path = write_gguf(model("qwen2"), TOK, tmp_path / "m.gguf", quant="f16")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for conv in CONVS[:5]:
        want = encode_chat(TOK, conv["messages"], tools=conv.get("tools"))
        got = ref.apply_chat_template(conv["messages"], tools=conv.get("tools"), tokenize=True, return_dict=True)
        assert list(got["input_ids"]) == want.ids.tolist()
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # digits one by one, then GPT-2's split
    assert fields["tokenizer.ggml.eos_token_id"].contents() == TOK.eos_id


def test_rope_pairs_order_by_hand():
    rows = np.arange(8)[:, None] * np.ones((1, 3))  # 2 heads of 4 rows: halves (0, 1 | 2, 3) and (4, 5 | 6, 7)
    assert rope_pairs_order(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_what_gguf_cannot_carry_is_refused_and_nothing_written(tmp_path):
    from tokenizers import Tokenizer as Backend, models as tmodels, pre_tokenizers

    from jkd.data.tokenizer import Tokenizer

    out = tmp_path / "x.gguf"
    scaled = dataclasses.replace(
        model("llama").config,
        rope_scaling=Llama3RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
        ),
    )
    with pytest.raises(GGUFExportError, match="rope_scaling"):
        write_gguf(Decoder(scaled, rngs=nnx.Rngs(0)), TOK, out)
    word = Backend(tmodels.WordLevel({"a": 0, "<|im_end|>": 1}, unk_token="a"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(GGUFExportError, match="byte-level BPE tokenizers"):
        write_gguf(model("llama"), Tokenizer(word, eos_token="<|im_end|>", chat_template="x"), out)
    odd = Tokenizer.from_folder(_saved(TOK, tmp_path / "tok"))
    odd.backend.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(GGUFExportError, match="pre_tokenizer= .*--gguf-pre"):
        write_gguf(model("llama"), odd, out)
    with pytest.raises(GGUFExportError, match="unknown GGUF quantization 'q5_k'"):
        write_gguf(model("llama"), TOK, out, quant="q5_k")
    assert not out.exists() and list(tmp_path.glob("x.gguf*")) == []


def _saved(tok, folder):
    tok.save(folder)
    return folder


def test_jkd_lm_export_writes_a_gguf_file(tmp_path, capsys):
    from jkd import cli
    from jkd.models.hf import save_hf

    folder = save_hf(model("llama"), tmp_path / "student", tokenizer=TOK)
    out = tmp_path / "student.q4_0.gguf"
    assert cli.main(["lm", "export", str(folder), "--format", "gguf", "--quant", "q4_0", "--out", str(out)]) == 0
    assert f"wrote {out} (q4_0" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert cli.main(["lm", "export", str(folder), "--format", "gguf", "--out", str(tmp_path)]) == 2
    assert "is a folder; name the .gguf file" in capsys.readouterr().err


def test_pre_tokenizers_are_named_as_llama_cpp_names_them():
    from jkd.models.gguf_io import pre_tokenizer_name

    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": gpt2}) == "gpt-2"  # llama.cpp refuses "gpt2" here
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, gpt2]}}) == "smollm"
    with pytest.raises(GGUFExportError, match="--gguf-pre"):
        pre_tokenizer_name({"pre_tokenizer": {**gpt2, "use_regex": False}})
