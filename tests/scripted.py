"""A stand-in for jkd's sampler in job tests: each prompt decoded, answered by a script, encoded."""

from __future__ import annotations

from typing import Callable


class _Rows:
    """What :func:`jkd.models.sampler.generate` returns, as far as the jobs read it."""

    def __init__(self, rows):
        self._rows = rows

    def rows(self):
        return self._rows


def scripted_generate(reply: Callable[[str], str], tokenizer=None):
    """A ``generate(model, prompts, ...)`` that answers each prompt with ``reply(prompt text)``.
    ``tokenizer`` decodes and encodes; set ``.tokenizer`` later where the job makes it."""

    def generate(model, prompts, *, max_new_tokens, sampling, key, buckets):
        tok = generate.tokenizer
        return _Rows([tok.encode(reply(tok.decode(p))) for p in prompts])

    generate.tokenizer = tokenizer
    return generate
