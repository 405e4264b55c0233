"""A decoder and its tokenizer as one GGUF file, the format llama.cpp (and Ollama, LM Studio,
llamafile on top of it) runs.

:func:`write_gguf` writes what llama.cpp reads for the Llama, Qwen2 and Qwen3 architectures: the
tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``), the
hyper-parameters as ``<arch>.*`` keys, and the tokenizer as ``tokenizer.ggml.*`` (a byte-level
BPE: vocabulary, token types, merges, the pre-tokenizer's name, the special tokens' ids and the chat
template). Llama's query and key rows are reordered as llama.cpp's rotary embedding pairs them
(its converter does the same; Qwen's use the order Hugging Face writes).

Quantizations, by llama.cpp's names: ``f32``; ``f16``; ``q8_0`` (blocks of 32 weights, one scale:
every matrix); ``q4_0`` (blocks of 32 4-bit weights: every matrix but the embedding and the output
head, which stay ``q8_0`` as llama.cpp's own quantizer keeps them at higher precision). Norms and
biases stay float32; a matrix whose rows are not whole blocks stays ``f16``
(:func:`jkd.compress.gguf_blocks.tensor_type`, the rule a student trained for the file follows). The file is written
whole or not at all; a model or tokenizer the format cannot carry is refused, naming what is
missing, before anything is written. Writing needs the ``gguf`` package (from llama.cpp).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jkd.compress.gguf_blocks import QUANTS, tensor_type
from jkd.models.decoder_sharding import hf_name
from jkd.runtime.atomic import atomic_write

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# The pre-tokenizers llama.cpp knows by name, recognised by their definition in tokenizer.json.
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


class GGUFExportError(ValueError):
    """A model or tokenizer GGUF cannot carry (named with what is missing)."""


def gguf_name(hf: str) -> str:
    """llama.cpp's name of a Hugging Face tensor name (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``)."""
    if hf in _TOP:
        return _TOP[hf]
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER:
        return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:])]}"
    raise GGUFExportError(f"the tensor {hf} has no name in llama.cpp's llama/qwen2/qwen3 layout")


def rope_pairs_order(rows: np.ndarray, heads: int) -> np.ndarray:
    """Query or key rows ``[heads * head_dim, ...]`` reordered from Hugging Face's rotary layout
    (the two halves of each head rotate together) to llama.cpp's for Llama (neighbouring rows
    rotate together): within each head, row ``i`` of the first half goes to ``2i`` and row ``i``
    of the second half to ``2i + 1``."""
    dim = rows.shape[0] // heads
    return rows.reshape(heads, 2, dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer ``tokenizer.json`` defines: ``gpt-2`` (GPT-2's
    byte-level split), ``smollm`` (digits one by one, then GPT-2's split). Others are refused with
    what to do."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]

    def like(step, want):
        return all(step.get(k) == v for k, v in want.items())

    if len(steps) == 1 and like(steps[0], _GPT2_BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and like(steps[0], _DIGITS) and like(steps[1], _GPT2_BYTE_LEVEL):
        return "smollm"
    raise GGUFExportError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:160]}) is not one jkd can name for llama.cpp; name it "
        "with pre_tokenizer= (--gguf-pre), as llama.cpp's convert_hf_to_gguf.py names it for your model family "
        "(e.g. llama-bpe, qwen2)"
    )


def _vocabulary(tokenizer, rows: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (``rows`` of them: ids past the tokenizer's are ``[PAD<id>]``), their llama.cpp types
    and the BPE merges as ``"a b"``."""
    import gguf

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2's kind: Llama 3, Qwen, SmolLM2); "
            f"this one is {model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise GGUFExportError("the tokenizer has no BPE merges; llama.cpp needs them to tokenize")
    if tokenizer.vocab_size > rows:
        raise GGUFExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {rows} embedding rows"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [int(gguf.TokenType.UNUSED)] * rows
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, int(gguf.TokenType.NORMAL)
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    return tokens, types, merges


def gguf_plan(model, quant: str) -> list[tuple[str, str, tuple[int, ...], str]]:
    """``[(gguf name, Hugging Face name, shape, GGML type name)]`` of ``model``'s tensors at
    ``quant`` (:func:`jkd.compress.gguf_blocks.tensor_type`; refused, naming why, when llama.cpp
    could not run the model)."""
    if quant not in QUANTS:
        raise GGUFExportError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    cfg = model.config
    if cfg.family not in ARCHITECTURES:
        raise GGUFExportError(f"llama.cpp has no architecture for the {cfg.family!r} family")
    if cfg.rope_scaling is not None:
        raise GGUFExportError(
            "the model scales its rotary embedding (rope_scaling); jkd's GGUF export does not write "
            "llama.cpp's rope_freqs tensor yet"
        )
    if cfg.mlp_bias:
        raise GGUFExportError("the model has MLP biases, which llama.cpp's llama architecture does not read")
    state = nnx.state(model, nnx.Param)
    plan = []
    for path, v in nnx.to_flat_state(state):
        hf = hf_name(path)
        name = gguf_name(hf)
        plan.append((name, hf, tuple(v.shape), tensor_type(name, tuple(v.shape), quant)))
    return plan


def write_gguf(
    model, tokenizer, path: str | Path, *, quant: str = "f16", name: str | None = None, pre_tokenizer: str | None = None
) -> Path:
    """Write ``model`` (a :class:`~jkd.models.decoder.Decoder`) and ``tokenizer`` (a
    :class:`~jkd.data.tokenizer.Tokenizer`) to the GGUF file ``path`` at ``quant`` (one of
    :data:`QUANTS`). ``pre_tokenizer``: llama.cpp's name of the tokenizer's pre-tokenizer
    (default: recognised from its definition, :func:`pre_tokenizer_name`). Returns ``path``."""
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package (from llama.cpp): pip install gguf") from None
    cfg = model.config
    plan = gguf_plan(model, quant)
    tokens, types, merges = _vocabulary(tokenizer, cfg.vocab_size)
    pre = pre_tokenizer or pre_tokenizer_name(json.loads(tokenizer.backend.to_str()))
    if tokenizer.chat_template is None:
        raise GGUFExportError("the tokenizer has no chat template; llama.cpp's chat needs one in the file")
    arch = ARCHITECTURES[cfg.family]
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    state = {hf_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quant]

    def tensor(hf: str, kind: str) -> np.ndarray:
        x = np.asarray(jax.device_get(state[hf][...]), np.float32)
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            x = rope_pairs_order(x, cfg.num_heads if ".q_proj." in hf else cfg.num_kv_heads)
        if kind == "F32":
            return x
        if kind == "F16":
            return x.astype(np.float16)
        return gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, kind))

    def write(f) -> None:
        w = gguf.GGUFWriter(f.name, arch)
        w.add_name(name or "jkd student")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_key_length(head_dim)  # written even when hidden_size / num_heads: readers that default otherwise
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for key, tok_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
            if tok_id is not None:
                getattr(w, f"add_{key}_token_id")(int(tok_id))
        w.add_add_bos_token(False)  # the chat template writes the begin-of-text token where the model wants one
        w.add_chat_template(tokenizer.chat_template)
        for gname, hf, _, kind in plan:
            w.add_tensor(
                gname,
                tensor(hf, kind),
                raw_dtype=None if kind in ("F32", "F16") else getattr(gguf.GGMLQuantizationType, kind),
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write(path, write)
