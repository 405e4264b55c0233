"""Tiny random Hugging Face models, built and saved by ``transformers`` itself: the reference
implementation the decoder tests compare against (offline; torch and transformers are test-only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

FAMILIES = {
    # Llama 3.1 rope scaling with a short original context, so most frequencies are rescaled.
    "llama": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        rope_theta=10000.0,
    ),
    "qwen2": dict(tie_word_embeddings=True),  # q/k/v biases are part of the family
    "qwen3": dict(head_dim=24),  # head_dim != hidden / heads, and q/k norms
}


def hf_classes(family: str):
    import transformers as tr

    return {
        "llama": (tr.LlamaConfig, tr.LlamaForCausalLM),
        "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM),
        "qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM),
    }[family]


def build_hf_model(family: str, folder: Path, *, seed: int = 0, **overrides):
    """Build a random ``transformers`` model of ``family``, perturb every parameter (so biases and
    norm weights are not their trivial initial values), save it to ``folder``; returns it."""
    import torch

    cfg_cls, model_cls = hf_classes(family)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**TINY, **FAMILIES[family], **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def padded_batch(vocab: int, seed: int = 0):
    """Three rows of 20 tokens: full, right-padded (14 real), left-padded (15 real); positions
    count real tokens, as ``generate`` computes them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (3, 20))
    mask = np.ones((3, 20), bool)
    mask[1, 14:] = False
    mask[2, :5] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions
