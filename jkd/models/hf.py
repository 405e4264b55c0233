"""Hugging Face model folders in and out of jkd's :class:`~jkd.models.decoder.Decoder`.

``load_hf(folder)`` reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) tensor by tensor, casts each to the dtype asked for and places it
directly with its sharding when a mesh is given; nothing else of the checkpoint is held in memory.
``save_hf(model, folder)`` writes the same format (config, generation config, safetensors, the
tokenizer's files) into a temporary folder and renames it into place, so an interrupted save never
leaves a folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jkd.runtime.faults import missing_folder
from jkd.models import safetensors_io as st
from jkd.models.decoder import Decoder
from jkd.models.decoder_config import DecoderConfig, UnsupportedConfigError, from_hf_config, to_hf_config
from jkd.models.decoder_sharding import hf_name, parameter_sharding

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tensors some checkpoints carry that the forward pass does not use.
_UNUSED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match its config."""


def read_config(folder: str | Path) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Hugging Face folder's ``config.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise missing_folder(folder, what="model folder")
    path = folder / "config.json"
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise FileNotFoundError(
            f"{folder}: no config.json (found {found}); expected a Hugging Face model "
            "folder with config.json and model.safetensors"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        config = from_hf_config(cfg)
    except UnsupportedConfigError as e:  # "config.json: ..." names the file; say which folder's
        raise UnsupportedConfigError(f"{folder}/{e}") from None
    return _with_generation_ends(config, folder)


def _with_generation_ends(config: DecoderConfig, folder: Path) -> DecoderConfig:
    """``config`` with the end tokens of the folder's ``generation_config.json`` where it names
    some (``transformers.generate`` stops at those, ahead of ``config.json``'s): a teacher whose
    ``config.json`` has no ``eos_token_id`` still stops where its generation config says."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return config
    try:
        ends = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e})") from None
    if ends is None:
        return config
    ends = tuple(ends) if isinstance(ends, list) else (ends,)
    if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < config.vocab_size for e in ends):
        raise ValueError(f"{path}: eos_token_id {ends} must be token ids below the vocabulary size {config.vocab_size}")
    return dataclasses.replace(config, eos_token_id=ends[0] if len(ends) == 1 else ends)


def checkpoint_tensors(folder: str | Path) -> dict[str, st.TensorInfo]:
    """Every tensor of the folder's safetensors file(s), by name, from their headers."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are missing: {missing}")
    elif (folder / SINGLE).is_file():
        files, weight_map = [SINGLE], None
    else:
        raise FileNotFoundError(
            f"{folder}: neither {SINGLE} nor {INDEX} (jkd reads safetensors, not pytorch_model.bin)"
        )
    tensors: dict[str, st.TensorInfo] = {}
    for f in files:
        found, _ = st.read_header(folder / f)
        tensors.update(found)
    if weight_map is not None:
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise CheckpointMismatchError(
                f"{index} maps {len(absent)} tensor(s) to shards that lack them, e.g. {absent[:3]}"
            )
    return tensors


def _abstract(config: DecoderConfig, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0))))


def _match(config: DecoderConfig, expected: dict[str, tuple], tensors: dict[str, st.TensorInfo]) -> None:
    problems = []
    missing = [n for n in expected if n not in tensors]
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[:3]}")
    extra = [
        n
        for n in tensors
        if n not in expected
        and not n.endswith(_UNUSED_SUFFIXES)
        and not (config.tie_embeddings and n == "lm_head.weight")
    ]
    if extra:
        problems.append(f"{len(extra)} not in a {config.family} model of this config, e.g. {extra[:3]}")
    shapes = [
        f"{n} is {list(tensors[n].shape)}, config says {list(s)}"
        for n, s in expected.items()
        if n in tensors and tensors[n].shape != s
    ]
    if shapes:
        problems.append(f"{len(shapes)} of another shape: " + "; ".join(shapes[:3]))
    bad_dtype = [
        f"{n} ({tensors[n].dtype})"
        for n in expected
        if n in tensors and not np.issubdtype(tensors[n].dtype, np.floating) and tensors[n].dtype.name != "bfloat16"
    ]
    if bad_dtype:
        problems.append(f"non-float tensors (quantised checkpoint?): {bad_dtype[:3]}")
    if problems:
        raise CheckpointMismatchError("checkpoint tensors do not match config.json: " + "; ".join(problems))


def load_hf(folder: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> Decoder:
    """Load a Llama / Qwen2 / Qwen3 Hugging Face folder into a :class:`Decoder`.

    Args:
      folder: holds ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``
        with its shards.
      dtype: the parameters' dtype (``jnp.float32`` or ``jnp.bfloat16``), whatever the file holds.
      mesh: place each tensor directly with its sharding on this ``('data', 'model')`` mesh
        (:mod:`jkd.models.decoder_sharding`); default: the default device.

    Raises ``FileNotFoundError``, ``UnsupportedConfigError`` or ``CheckpointMismatchError`` naming
    what was found and what was expected, before any tensor is read.
    """
    folder = Path(folder)
    config = read_config(folder)
    tensors = checkpoint_tensors(folder)
    graphdef, abstract = _abstract(config, dtype)
    flat = list(nnx.to_flat_state(abstract))
    expected = {hf_name(path): tuple(v.shape) for path, v in flat}
    _match(config, expected, tensors)
    target = np.dtype(jnp.dtype(dtype))
    leaves = []
    # Largest first: the one host tensor held beside the model is large only while little of
    # the model is loaded (peak ~ model + the smallest late tensor, not model + the largest).
    for path, var in sorted(flat, key=lambda pv: -tensors[hf_name(pv[0])].nbytes):
        name = hf_name(path)
        host = st.read_tensor(tensors[name])
        if host.dtype != target:
            host = host.astype(target)
        if mesh is None:
            value = jax.device_put(host)
        else:
            sharding = parameter_sharding(path, host.shape, mesh)
            value = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
        # Wait for the copy, then drop the host array before the next read: at most one
        # checkpoint tensor is held beside the model.
        value.block_until_ready()
        del host
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _shard_plan(entries: list[tuple[str, tuple, np.dtype]], max_bytes: int) -> list[list[tuple]]:
    shards, current, size = [], [], 0
    for e in entries:
        n = int(np.prod(e[1])) * e[2].itemsize
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    return shards + [current]


def save_hf(
    model: Decoder,
    folder: str | Path,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` as a Hugging Face folder (``config.json``, ``generation_config.json``,
    safetensors, and the tokenizer's files when ``tokenizer`` has a ``save(folder)`` method).

    ``dtype`` defaults to the model's; files over ``max_shard_bytes`` are split into shards with
    an index, as ``transformers`` does. The folder appears only once complete; an existing
    non-empty folder is refused unless ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace it")
    config: DecoderConfig = model.config
    state = nnx.state(model, nnx.Param)
    by_name = {hf_name(path): v for path, v in nnx.to_flat_state(state)}
    out_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(model.dtype)
    entries = [(n, tuple(v.shape), out_dtype) for n, v in by_name.items()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fetch = lambda n: np.asarray(jax.device_get(by_name[n][...])).astype(out_dtype)  # noqa: E731
        plan = _shard_plan(entries, max_shard_bytes)
        if len(plan) == 1:
            st.write_file(tmp / SINGLE, plan[0], fetch)
        else:
            weight_map = {}
            for i, shard in enumerate(plan):
                fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                st.write_file(tmp / fname, shard, fetch)
                weight_map.update({e[0]: fname for e in shard})
            total = sum(int(np.prod(e[1])) * e[2].itemsize for e in entries)
            (tmp / INDEX).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        dtype_name = "bfloat16" if out_dtype.name == "bfloat16" else out_dtype.name
        (tmp / "config.json").write_text(json.dumps(to_hf_config(config, dtype=dtype_name), indent=2))
        gen: dict[str, Any] = {
            k: v
            for k, v in (
                ("bos_token_id", config.bos_token_id),
                ("eos_token_id", config.eos_token_id),
                ("pad_token_id", config.pad_token_id),
            )
            if v is not None
        }
        if isinstance(gen.get("eos_token_id"), tuple):
            gen["eos_token_id"] = list(gen["eos_token_id"])
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
