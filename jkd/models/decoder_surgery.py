"""A smaller decoder cut from a larger one: some of its layers, the rest shared.

DistilBERT (Sanh et al. 2019) initialises its student with one layer in two of the teacher's;
Minitron (Muralidharan et al. 2024) prunes depth, then distils. :func:`select_layers` is that
first step for jkd's decoders: the student keeps the teacher's embeddings, final norm and output
projection and the chosen blocks, and distillation then repairs what the missing blocks did.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

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
