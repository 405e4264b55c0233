"""Sequence-level distillation (Kim and Rush 2016): the teacher answers prompts, the student learns
the answers.

:func:`teacher_answers` samples the teacher's continuations of a list of prompts, batch by batch,
and keeps each finished batch on disk (``<cache>/<settings>/batch-00012.npz``, written under a
temporary name and renamed). The folder is keyed by the teacher's identity and the sampling
settings; each file by its batch's prompts. A run killed during generation resumes at the first
batch not on disk, and, since every batch's random key is derived from the seed and the batch's
number, its answers are exactly those of an uninterrupted run. :func:`answer_batches` then turns
prompts and answers into the ``[B, T]`` batches of :func:`jkd.train.lm_steps.token_kd_step`
(``loss_mask`` on the answers), trained with ``TokenKD(kd_weight=0, ce_weight=1)`` or mixed with
token-level KD on the same sequences.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import jax
import numpy as np

from jkd.runtime.atomic import atomic_write
from jkd.data.conversations import sequence_batches
from jkd.train.stored import teacher_identity
from jkd.models.sampler import SamplingConfig, generate
from jkd.train.state import freeze_model

if TYPE_CHECKING:
    from jkd.models.decoder import Decoder


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()


def _prompts_key(prompts: Sequence[Sequence[int]]) -> str:
    return _digest(*(np.asarray(p, np.int64).tobytes() + b"|" for p in prompts))


def teacher_answers(
    teacher: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    cache_dir: str | Path,
    teacher_id: str | None = None,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(temperature=1.0),
    seed: int = 0,
    batch_size: int = 16,
    stop_tokens: Sequence[int] | None = None,
    progress: bool = False,
    progress_every_s: float = 10.0,
) -> list[np.ndarray]:
    """The teacher's answer to every prompt (token ids, stop token included), cached on disk.

    Args:
      teacher: the teacher decoder (sharded or not).
      prompts: token-id sequences (e.g. ``encode_chat(..., add_generation_prompt=True).ids``).
      cache_dir: where answers are kept; one sub-folder per (teacher, settings).
      teacher_id: names the teacher's weights; default :func:`jkd.train.stored.teacher_identity`
        of its parameters and config (one pass over the weights), so changed weights never read
        another teacher's answers. Pass a name you keep stable yourself to skip that pass.
      max_new_tokens, sampling, stop_tokens: as :func:`jkd.models.sampler.generate`.
      seed: batch ``i`` samples with ``fold_in(key(seed), i)``.
      batch_size: prompts per generation call (and per file).
      progress: a line on stderr every ``progress_every_s`` seconds (0: every batch) and at the end.
    """
    if teacher_id is None:
        teacher_id = teacher_identity(freeze_model(teacher)[1], teacher.config)
    settings = _digest(
        teacher_id, max_new_tokens, sampling, seed, batch_size, None if stop_tokens is None else tuple(stop_tokens)
    )
    folder = Path(cache_dir) / f"answers-{settings}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(
        folder / "settings.json",
        json.dumps(
            {
                "teacher": teacher_id,
                "max_new_tokens": max_new_tokens,
                "sampling": repr(sampling),
                "seed": seed,
                "batch_size": batch_size,
                "stop_tokens": None if stop_tokens is None else list(stop_tokens),
            },
            indent=2,
        ),
    )
    n_batches = -(-len(prompts) // batch_size)
    answers: list[np.ndarray] = []
    cached = 0
    t0 = shown = time.perf_counter()
    for i in range(n_batches):
        chunk = prompts[i * batch_size : (i + 1) * batch_size]
        path = folder / f"batch-{i:05d}.npz"
        key = _prompts_key(chunk)
        if path.exists():
            with np.load(path) as z:
                if str(z["prompts"]) == key:
                    answers.extend(np.split(z["tokens"], np.cumsum(z["lengths"])[:-1]))
                    cached += 1
                    continue
        out = generate(
            teacher,
            chunk,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            key=jax.random.fold_in(jax.random.key(seed), i),
            stop_tokens=stop_tokens,
        )
        rows = out.rows()
        atomic_write(
            path,
            lambda f: np.savez(
                f,
                prompts=np.asarray(key),
                lengths=np.asarray([len(r) for r in rows], np.int64),
                tokens=np.concatenate(rows) if rows else np.zeros((0,), np.int32),
            ),
        )
        answers.extend(rows)
        if progress and i + 1 < n_batches and time.perf_counter() - shown >= progress_every_s:
            shown = time.perf_counter()
            done = i + 1
            rate = (done - cached) / max(time.perf_counter() - t0, 1e-9)
            print(
                f"teacher answers: batch {done}/{n_batches} ({cached} from the cache, {rate:.2f} batches/s)",
                file=sys.stderr,
                flush=True,
            )
    if progress:
        print(f"teacher answers: batch {n_batches}/{n_batches} ({cached} from the cache)", file=sys.stderr, flush=True)
    return answers


def answer_batches(
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    batch_size: int,
    length: int,
    pad_id: int = 0,
    start: int = 0,
    seed: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``[batch_size, length]`` batches of prompt + answer, ``loss_mask`` on the answer
    tokens, in a shuffled order that depends on ``seed`` and the epoch; ``start`` is the data
    position in batches (what the fit loop resumes from). Rows longer than ``length`` are cut."""
    ids = [np.concatenate([np.asarray(p, np.int32), np.asarray(a, np.int32)]) for p, a in zip(prompts, answers)]
    learn = [np.arange(len(i)) >= len(p) for i, p in zip(ids, prompts)]
    return sequence_batches(ids, learn, batch_size=batch_size, length=length, pad_id=pad_id, seed=seed, start=start)
