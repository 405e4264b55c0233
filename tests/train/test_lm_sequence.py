"""Teacher answers on disk: reused for the same teacher and settings, never for changed weights."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jkd.models.decoder import Decoder
from jkd.train import lm_sequence
from tests.train.lm_pipeline_script import TEACHER


def test_answers_are_reused_only_for_the_same_weights(tmp_path, monkeypatch):
    teacher = Decoder(TEACHER, rngs=nnx.Rngs(1))
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    first = lm_sequence.teacher_answers(teacher, prompts, cache_dir=tmp_path, max_new_tokens=5, batch_size=2)
    calls = []
    real = lm_sequence.generate
    monkeypatch.setattr(lm_sequence, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = lm_sequence.teacher_answers(teacher, prompts, cache_dir=tmp_path, max_new_tokens=5, batch_size=2)
    assert calls == [] and all(np.array_equal(a, b) for a, b in zip(first, again))
    nnx.update(teacher, jax.tree.map(lambda x: x * 3 if x.ndim == 2 else x, nnx.state(teacher)))
    lm_sequence.teacher_answers(teacher, prompts, cache_dir=tmp_path, max_new_tokens=5, batch_size=2)
    assert len(calls) == 2  # changed weights: both batches generated again, in a folder of their own
    assert len(list(tmp_path.glob("answers-*"))) == 2
