"""The decoder's config, and its exchange with Hugging Face ``config.json`` files.

``DecoderConfig`` is what jkd's decoder reads: one frozen dataclass, checked on creation.
``from_hf_config`` reads a Llama / Qwen2 / Qwen3 ``config.json`` dict and refuses, by name, every
field whose value jkd's decoder would not reproduce (sliding windows, other rope types, other
activations, quantisation, unknown keys); ``to_hf_config`` writes the dict back so that
``transformers`` (4.x ``rope_theta``/``rope_scaling`` and 5.x ``rope_parameters``) reads it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class UnsupportedConfigError(ValueError):
    """A ``config.json`` asks for something jkd's decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's rotary frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only transformer of the Llama / Qwen2 / Qwen3 family.

    ``family`` fixes what the checkpoint format implies: Qwen2 has q/k/v biases (no o bias),
    Qwen3 has per-head RMSNorm on queries and keys, Llama has neither (``attention_bias`` adds
    biases to q, k, v and o in Llama and Qwen3). ``head_dim`` defaults to
    ``hidden_size // num_heads``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    family: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False  # llama / qwen3: biases on q, k, v and o
    mlp_bias: bool = False  # llama only
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"DecoderConfig.family: got {self.family!r}, expected one of {FAMILIES}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DecoderConfig.{name}: got {v!r}, expected a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"DecoderConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                    f"{self.num_heads}; give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(
                f"DecoderConfig.head_dim: got {self.head_dim!r}, expected an even integer >= 2 "
                "(rotary embeddings rotate pairs)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DecoderConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads} (grouped-query attention shares each key/value head "
                "among an equal number of query heads)"
            )
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"DecoderConfig.rms_norm_eps: got {self.rms_norm_eps}, expected > 0")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"DecoderConfig.rope_theta: got {self.rope_theta}, expected > 0")
        if self.mlp_bias and self.family != "llama":
            raise ValueError(
                f"DecoderConfig.mlp_bias: only the llama family has MLP biases, got family {self.family!r}"
            )
        if self.attention_bias and self.family == "qwen2":
            raise ValueError(
                "DecoderConfig.attention_bias: qwen2 always has q/k/v biases and never an "
                "o bias; leave attention_bias False for qwen2"
            )
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"DecoderConfig.{name}: got {v}, expected an id in [0, {self.vocab_size})")

    # What the family implies for the layers.
    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    def num_parameters(self) -> int:
        d, h, kv, hd, f, v = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.vocab_size,
        )
        attn = d * hd * (h + 2 * kv) + h * hd * d
        attn += (h + 2 * kv) * hd * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * layer + d


# ------------------------------------------------------------------------------------------------
# Hugging Face config.json

# Read into DecoderConfig.
_READ = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "model_type",
    "architectures",
    "hidden_act",
}
# Irrelevant to the forward pass (training-time, bookkeeping or generation defaults).
_IGNORED = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "initializer_range",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tokenizer_class",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "bad_words_ids",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "prefix",
    "task_specific_params",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "tie_encoder_decoder",
    "finetuning_task",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "is_decoder",
    "decoder_start_token_id",
    "sep_token_id",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "model_input_names",
    "unk_token_id",
}
# Accepted only at the value that means "nothing special".
_DEFAULT_ONLY = {
    "attention_dropout": (0, 0.0),
    "pretraining_tp": (1,),
    "use_sliding_window": (False,),
    "quantization_config": (None,),
    "hidden_dropout": (0, 0.0),
    "rope_interleaved": (False, None),  # interleaved rotary pairs (SmolLM2's configs carry it, off)
}
# Mixture-of-experts counts: accepted only for a dense model (jkd's decoder has one MLP per block).
_EXPERTS = {"num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts"}


class ConfigWarning(UserWarning):
    """A ``config.json`` key jkd does not know, ignored: the model types jkd reads are those whose
    ``transformers`` classes ignore it too, so it cannot change the reference forward pass."""


# Consulted only when use_sliding_window is on (refused above).
_SLIDING_ONLY = {"sliding_window", "max_window_layers"}


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    params = cfg.get("rope_parameters")
    if params is None:  # transformers 4.x: rope_theta beside an optional rope_scaling dict
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        try:
            return theta, Llama3RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise UnsupportedConfigError(f"config.json: llama3 rope scaling lacks {e.args[0]!r}") from None
    raise UnsupportedConfigError(
        f"config.json: rope_type {rope_type!r} is not supported (jkd's decoder implements 'default' and 'llama3')"
    )


def from_hf_config(cfg: dict[str, Any]) -> DecoderConfig:
    """A ``DecoderConfig`` from a Hugging Face ``config.json`` dict (Llama, Qwen2, Qwen3).

    Raises ``UnsupportedConfigError`` naming each field whose value the decoder would not reproduce.
    """
    family = cfg.get("model_type")
    if family not in FAMILIES:
        arch = cfg.get("architectures")
        raise UnsupportedConfigError(
            f"config.json: model_type {family!r} (architectures {arch}) is not supported; jkd's decoder "
            f"reads {', '.join(FAMILIES)}"
        )
    problems, unknown = [], []
    for key, value in cfg.items():
        if key in _READ or key in _IGNORED or key in _SLIDING_ONLY:
            continue
        if key in _EXPERTS:
            if value not in (None, 0, 1):
                problems.append(f"{key}={value!r} (a mixture of experts; jkd's decoder is dense)")
            continue
        if key in _DEFAULT_ONLY:
            if value not in _DEFAULT_ONLY[key]:
                problems.append(f"{key}={value!r} (supported: {_DEFAULT_ONLY[key][0]!r})")
            continue
        if key == "layer_types":
            others = sorted(set(value) - {"full_attention"})
            if others:
                problems.append(f"layer_types with {others} (supported: only 'full_attention')")
            continue
        unknown.append(f"{key}={value!r}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r} (supported: 'silu')")
    if family == "qwen2" and cfg.get("attention_bias"):
        problems.append("attention_bias=True for qwen2 (qwen2's biases are fixed: q, k, v)")
    if family != "llama" and cfg.get("mlp_bias"):
        problems.append(f"mlp_bias=True for {family}")
    if problems:
        raise UnsupportedConfigError(f"config.json ({family}): unsupported field(s): " + "; ".join(problems))
    if unknown:
        warnings.warn(
            f"config.json ({family}): ignored field(s) unknown to jkd: {'; '.join(unknown)} "
            f"(transformers' {family} model does not read them either)",
            ConfigWarning,
            stacklevel=2,
        )
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if k not in cfg
    ]
    if missing:
        raise UnsupportedConfigError(f"config.json: missing required field(s) {missing}")
    theta, scaling = _rope_from_hf(cfg)
    return DecoderConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        head_dim=cfg.get("head_dim"),
        family=family,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)) if family != "qwen2" else False,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def to_hf_config(config: DecoderConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict of ``config`` (read by transformers 4.x and 5.x, vLLM, llama.cpp)."""
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling is not None:
        rope = {"rope_theta": config.rope_theta, "rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_embeddings,
        # transformers 5 reads rope_parameters; 4.x and other converters read these two.
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if config.family != "qwen2":
        out["attention_bias"] = config.attention_bias
    if config.family == "llama":
        out["mlp_bias"] = config.mlp_bias
    else:
        out["use_sliding_window"] = False
    return out
