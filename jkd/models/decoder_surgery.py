"""A smaller decoder cut from a larger one: some of its layers, the rest shared; or narrower.

DistilBERT (Sanh et al. 2019) initialises its student with one layer in two of the teacher's;
Minitron (Muralidharan et al. 2024) prunes depth, then distils. :func:`select_layers` is that
first step for jkd's decoders: the student keeps the teacher's embeddings, final norm and output
projection and the chosen blocks, and distillation then repairs what the missing blocks did.

Minitron also prunes width by activation importance on a calibration batch:
:func:`width_importance` measures each MLP channel (the mean magnitude of ``silu(gate(h)) *
up(h)``, what the down projection reads) and each key/value group (the mean L2 norm of its query
heads' attention outputs, what the output projection reads) over the real tokens;
:func:`prune_width` keeps the most important ones, the same number in every layer (a Hugging Face
config has one size for all layers).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jkd.models.decoder import Decoder


def select_layers(model: Decoder, layers: Sequence[int]) -> Decoder:
    """A new :class:`Decoder` with ``model``'s blocks ``layers`` (in that order) and its
    embeddings, final norm and output projection (copies: ``model`` is left as it is)."""
    n = model.config.num_layers
    layers = [int(i) for i in layers]
    if not layers or any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"select_layers: layers must be distinct indices in [0, {n}); got {list(layers)}")
    config = dataclasses.replace(model.config, num_layers=len(layers))
    student = nnx.eval_shape(lambda: Decoder(config, dtype=model.dtype, rngs=nnx.Rngs(0)))
    src = nnx.to_flat_state(nnx.state(model, nnx.Param))
    by_path = {path: v for path, v in src}
    remap = {new: old for new, old in enumerate(layers)}
    flat = []
    for path, _ in nnx.to_flat_state(nnx.state(student, nnx.Param)):
        if len(path) > 1 and path[0] == "layers":
            old = (path[0], remap[int(path[1])], *path[2:])
        else:
            old = path
        flat.append((path, by_path[old][...].copy()))
    nnx.update(student, nnx.from_flat_state([(p, nnx.Param(v)) for p, v in flat]))
    return student


class _Inputs:
    """Stands in for a projection during calibration: records what it reads, then applies it."""

    def __init__(self, linear):
        self.linear, self.seen = linear, []

    def __call__(self, x):
        self.seen.append(x)
        return self.linear(x)


def width_importance(model: Decoder, tokens, *, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Minitron's activation importance on a calibration batch ``tokens [B, T]`` (eagerly, not
    jitted): ``(mlp [L, F], kv_groups [L, Hkv])``, per layer the mean over real tokens of each MLP
    channel's ``|silu(gate(h)) * up(h)|`` and of each key/value group's L2 norm of its query heads'
    attention outputs."""
    cfg = model.config
    real = np.ones(np.shape(tokens), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    taps = []
    for layer in model.layers:
        taps.append((_Inputs(layer.mlp.down_proj), _Inputs(layer.self_attn.o_proj)))
        layer.mlp.down_proj, layer.self_attn.o_proj = taps[-1]
    try:
        model(jnp.asarray(tokens, jnp.int32), attention_mask=None if attention_mask is None else jnp.asarray(real))
    finally:
        for layer, (down, out) in zip(model.layers, taps):
            layer.mlp.down_proj, layer.self_attn.o_proj = down.linear, out.linear
    group = cfg.num_heads // cfg.num_kv_heads
    mlp, kv = [], []
    for down, out in taps:
        act = np.asarray(down.seen[0], np.float64)[real]  # [N, F]
        mlp.append(np.abs(act).mean(0))
        heads = np.asarray(out.seen[0], np.float64)[real].reshape(-1, cfg.num_kv_heads, group, cfg.head_dim)
        kv.append(np.linalg.norm(heads, axis=-1).sum(-1).mean(0))
    return np.stack(mlp), np.stack(kv)


def narrower_config(config, *, intermediate_size: int | None = None, num_kv_heads: int | None = None):
    """``config`` with ``intermediate_size`` MLP channels and ``num_kv_heads`` key/value heads (each
    with its query heads; None keeps them); ``head_dim`` stays."""
    group = config.num_heads // config.num_kv_heads
    kv = config.num_kv_heads if num_kv_heads is None else num_kv_heads
    return dataclasses.replace(
        config,
        intermediate_size=intermediate_size or config.intermediate_size,
        num_kv_heads=kv,
        num_heads=kv * group,
        head_dim=config.head_dim,
    )


def prune_width(
    model: Decoder,
    importance: tuple[np.ndarray, np.ndarray],
    *,
    intermediate_size: int | None = None,
    num_kv_heads: int | None = None,
) -> Decoder:
    """A copy of ``model`` keeping, in every layer, its ``intermediate_size`` most important MLP
    channels and its ``num_kv_heads`` most important key/value groups with their query heads (in
    their original order; ``importance`` from :func:`width_importance`; None keeps all). The
    embeddings, norms and output projection are shared; ``head_dim`` stays."""
    cfg = model.config
    f = cfg.intermediate_size if intermediate_size is None else int(intermediate_size)
    g = cfg.num_kv_heads if num_kv_heads is None else int(num_kv_heads)
    if not 1 <= f <= cfg.intermediate_size or not 1 <= g <= cfg.num_kv_heads:
        raise ValueError(
            f"prune_width: intermediate_size must lie in [1, {cfg.intermediate_size}] and num_kv_heads in "
            f"[1, {cfg.num_kv_heads}]; got {intermediate_size}, {num_kv_heads}"
        )
    mlp_imp, kv_imp = importance
    if mlp_imp.shape != (cfg.num_layers, cfg.intermediate_size) or kv_imp.shape != (cfg.num_layers, cfg.num_kv_heads):
        raise ValueError(
            f"prune_width: importance of shapes {mlp_imp.shape}, {kv_imp.shape} does not fit this model "
            f"({cfg.num_layers} layers, {cfg.intermediate_size} channels, {cfg.num_kv_heads} kv heads)"
        )
    group, hd = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    config = narrower_config(cfg, intermediate_size=f, num_kv_heads=g)
    out = nnx.eval_shape(lambda: Decoder(config, dtype=model.dtype, rngs=nnx.Rngs(0)))
    src = {path: v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    keep_f = [np.sort(np.argsort(-imp, kind="stable")[:f]) for imp in mlp_imp]
    keep_g = [np.sort(np.argsort(-imp, kind="stable")[:g]) for imp in kv_imp]

    def rows(groups, per):  # the rows (or columns) of these heads, ``per`` heads to a group
        return np.concatenate(
            [np.arange((k * per + j) * hd, (k * per + j + 1) * hd) for k in groups for j in range(per)]
        )

    flat = []
    for path, _ in nnx.to_flat_state(nnx.state(out, nnx.Param)):
        x = src[path]
        if path[0] == "layers":
            i, part, name = int(path[1]), path[-2], path[-1]
            q_rows, kv_rows = rows(keep_g[i], group), rows(keep_g[i], 1)
            if part in ("gate_proj", "up_proj"):
                x = x[keep_f[i]]
            elif part == "down_proj" and name == "weight":
                x = x[:, keep_f[i]]
            elif part == "q_proj":
                x = x[q_rows]
            elif part in ("k_proj", "v_proj"):
                x = x[kv_rows]
            elif part == "o_proj" and name == "weight":
                x = x[:, q_rows]
        flat.append((path, nnx.Param(jnp.asarray(x))))
    nnx.update(out, nnx.from_flat_state(flat))
    return out
