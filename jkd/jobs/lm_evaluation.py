"""A language model measured as an agent on held-out conversations.

:func:`evaluate_model` answers every assistant turn of the test conversations greedily (the
conversation before the turn is the prompt) and scores the answers with
:func:`jkd.evaluate.toolcalls.tool_metrics`, plus agreement with reference answers (the teacher's)
and generation speed. :func:`test_cross_entropy` is the teacher-forced cross-entropy per assistant
token (perplexity is its exponential).
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jkd.data.conversations import Encoded, Turn, padded_rows
from jkd.data.tokenizer import Tokenizer
from jkd.agents.formats import HERMES, ToolFormat
from jkd.agents.tasks import Task, run_tasks, task_metrics
from jkd.agents.tools import Toolbox
from jkd.evaluate.toolcalls import tool_metrics
from jkd.models.decoder import Decoder
from jkd.models.sampler import SamplingConfig, generate
from jkd.runtime import hosts

GENERATE_BATCH = 128
BUCKETS = tuple(range(32, 4097, 32))  # prompt lengths: chat turns differ by tens of tokens


def generate_rows(
    model: Decoder,
    prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    batch_size: int = GENERATE_BATCH,
    sampling: SamplingConfig = SamplingConfig(),
    key: int = 0,
) -> tuple[list[np.ndarray], float | None]:
    """The new tokens of ``model``'s answers to ``prompts`` (greedy by default; batch ``b`` samples
    with ``fold_in(key(key), b)``) and the generation speed in new tokens per second (the batches
    after the first, which compiles; None without prompts).

    In a run of several processes each answers its share of the prompts and all gather the answers
    (every process returns all of them; the speed is this process's)."""
    if not len(prompts):
        return [], None
    answer = functools.partial(
        _answer_rows, model, max_new_tokens=max_new_tokens, batch_size=batch_size, sampling=sampling, key=key
    )
    if hosts.process_count() == 1:
        return answer(prompts)
    shares = hosts.shares(len(prompts))
    mine = shares[hosts.process_index()]
    rows, speed = answer([prompts[i] for i in mine])
    padded = np.full((len(rows), max_new_tokens + 1), -1, np.int32)  # the last column: the row's length
    for r, row in enumerate(rows):
        padded[r, : len(row)], padded[r, -1] = row, len(row)
    every = hosts.allgather_rows(padded, axis=0, sizes=[len(s) for s in shares])
    return [r[: r[-1]] for r in every], speed


def generate_texts(
    model: Decoder,
    prompts: Sequence[np.ndarray],
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int,
    batch_size: int = GENERATE_BATCH,
) -> tuple[list[str], float | None]:
    """Greedy answers to ``prompts`` (decoded with special tokens kept: some families' tool-call
    markers are special tokens) and the speed, as :func:`generate_rows`."""
    rows, speed = generate_rows(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(r) for r in rows], speed


def _answer_rows(
    model: Decoder,
    prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    batch_size: int,
    sampling: SamplingConfig = SamplingConfig(),
    key: int = 0,
) -> tuple[list[np.ndarray], float | None]:
    """The new tokens of the answers to ``prompts``, in their order, and the speed."""
    if not len(prompts):
        return [], None
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a bucket
    answers: list[np.ndarray] = [np.zeros(0, np.int32)] * len(prompts)
    tokens, seconds = 0, 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [prompts[i] for i in idx]
        chunk += [chunk[0]] * (batch_size - len(chunk))  # one batch shape: one compiled program
        t0 = time.perf_counter()
        out = generate(
            model,
            chunk,
            max_new_tokens=max_new_tokens,
            buckets=BUCKETS,
            sampling=sampling,
            key=jax.random.fold_in(jax.random.key(key), start),
        )
        dt = time.perf_counter() - t0
        if start > 0:
            tokens, seconds = tokens + int(out.lengths.sum()), seconds + dt
        for i, row in zip(idx, out.rows()):
            answers[i] = np.asarray(row, np.int32)
    if seconds == 0:  # one batch only: time it again, compiled
        t0 = time.perf_counter()
        out = generate(
            model,
            chunk,
            max_new_tokens=max_new_tokens,
            buckets=BUCKETS,
            sampling=sampling,
            key=jax.random.fold_in(jax.random.key(key), 0),
        )
        tokens, seconds = int(out.lengths.sum()), time.perf_counter() - t0
    return answers, tokens / seconds


def evaluate_tasks(
    model: Decoder,
    tokenizer: Tokenizer,
    tasks: Sequence[Task],
    *,
    tools: Toolbox,
    tool_format: ToolFormat,
    max_new_tokens: int,
    max_turns: int,
    max_length: int,
    pass_k: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict:
    """:func:`jkd.agents.tasks.task_metrics` of ``model`` playing ``tasks`` in the loop: greedy,
    and ``pass_k`` more times sampled at ``temperature`` (sample ``j``'s keys from ``(seed, j)``)."""

    def player(sampling: SamplingConfig, sample: int):
        turns = iter(range(max_turns))

        def gen(prompts):  # turn t of sample j draws from its own key: reruns give the same trajectories
            key = (seed * max(pass_k, 1) + sample) * max_turns + next(turns)
            return generate_rows(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, key=key)[0]

        return gen

    def play(gen):
        return run_tasks(
            gen, tokenizer, tasks, tools=tools, tool_format=tool_format, max_turns=max_turns, max_length=max_length
        )

    greedy = play(player(SamplingConfig(), 0))
    sampled = [play(player(SamplingConfig(temperature=temperature), j)) for j in range(pass_k)]
    return task_metrics(tasks, greedy, sampled, tools.defaults)


def evaluate_model(
    model: Decoder,
    turns: Sequence[Turn],
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int,
    reference_texts: Sequence[str] | None = None,
    tool_format: ToolFormat = HERMES,
) -> tuple[dict, list[str]]:
    """Tool-use metrics of ``model`` on ``turns``, its calls read in ``tool_format``;
    ``agreement_with_teacher`` with ``reference_texts``
    (the teacher's answers) when given: the share of turns where both answers are the same non-empty
    text (two empty answers agree on nothing). A metric with nothing to measure is None. Returns
    ``(metrics, generated texts)``."""
    texts, speed = generate_texts(model, [t.prompt for t in turns], tokenizer, max_new_tokens=max_new_tokens)
    metrics = tool_metrics(
        [(t.reference, t.context, text) for t, text in zip(turns, texts)], tool_format, tokenizer.special_token_texts
    )
    metrics["generation_tokens_per_s"] = speed
    if reference_texts is not None:
        metrics["agreement_with_teacher"] = agreement(texts, reference_texts)
    return metrics, texts


def measure(
    model: Decoder,
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    encoded: Encoded,
    *,
    max_length: int,
    max_new_tokens: int,
    pad_id: int,
    reference_texts: Sequence[str] | None = None,
    tool_format: ToolFormat = HERMES,
    tasks: Sequence[Task] = (),
    tools: Toolbox | None = None,
    max_turns: int = 3,
    pass_k: int = 0,
    pass_temperature: float = 1.0,
) -> tuple[dict, list[str]]:
    """What a report gives for one model: :func:`evaluate_model` on ``turns``,
    :func:`test_cross_entropy` on the ``encoded`` conversations and, with ``tasks`` and ``tools``,
    :func:`evaluate_tasks`. Returns ``(metrics, texts)``."""
    metrics, texts = evaluate_model(
        model, turns, tokenizer, max_new_tokens=max_new_tokens, reference_texts=reference_texts, tool_format=tool_format
    )
    metrics["test_cross_entropy"] = test_cross_entropy(model, encoded, max_length, pad_id)
    if tasks and tools is not None:
        metrics.update(
            evaluate_tasks(
                model,
                tokenizer,
                tasks,
                tools=tools,
                tool_format=tool_format,
                max_new_tokens=max_new_tokens,
                max_turns=max_turns,
                max_length=max_length,
                pass_k=pass_k,
                temperature=pass_temperature,
            )
        )
    return metrics, texts


def agreement(texts: Sequence[str], references: Sequence[str]) -> float | None:
    """The share of answers equal to their reference (whitespace at the ends aside) and not empty:
    two empty answers agree on nothing. None when there is nothing to compare."""
    same = [bool(a.strip()) and a.strip() == b.strip() for a, b in zip(texts, references)]
    return float(np.mean(same)) if same else None


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll(graphdef, state, tokens, attention, learn):
    model = nnx.merge(graphdef, state)
    logits = model(tokens, attention_mask=attention)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    where = learn[:, 1:] & attention[:, 1:]
    return jnp.sum(jnp.where(where, nll, 0.0)), jnp.sum(where)


def test_cross_entropy(
    model: Decoder, data: Encoded, length: int, pad_id: int, *, batch_size: int = 32
) -> float | None:
    """Mean cross-entropy (nats) per assistant token of ``data``, teacher-forced (None without one)."""
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids, learn = list(data.ids[start : start + batch_size]), list(data.learn[start : start + batch_size])
        pad = batch_size - len(ids)  # one batch shape: one compiled program
        rows = padded_rows(
            ids + [np.zeros(0, np.int32)] * pad, learn + [np.zeros(0, bool)] * pad, length=length, pad_id=pad_id
        )
        s, n = _nll(
            graphdef,
            state,
            jnp.asarray(rows["tokens"]),
            jnp.asarray(rows["attention_mask"]),
            jnp.asarray(rows["loss_mask"]),
        )
        total, count = total + float(s), count + int(n)
    return total / count if count else None
