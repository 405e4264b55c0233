"""The agent loop: a model's calls run through the tools, their results go back to it.

:func:`agent_rows` (:func:`agent_exchanges`) carries the teacher's answers to requests through
the loop for sequence-level distillation: each answer's calls run
(:meth:`jkd.agents.tools.Toolbox.call`), the results (or what went wrong) join the conversation as
``tool`` messages, and the teacher answers them; :func:`exchange_conversations` gives the exchanges
as text, for a student of another tokenizer.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import numpy as np

from jkd.agents.formats import HERMES, ToolFormat
from jkd.agents.tools import ToolResult, Toolbox
from jkd.data.chat import encode_chat
from jkd.data.tokenizer import Tokenizer


def tool_messages(calls: Sequence[tuple[str, dict]], results: Sequence[ToolResult]) -> list[dict]:
    """The ``tool`` messages that give ``results`` back to the model, one per call, in order."""
    return [{"role": "tool", "name": name, "content": r.content} for (name, _), r in zip(calls, results)]


@dataclasses.dataclass
class Exchanges:
    """The teacher's answers to requests carried through the loop (:func:`agent_exchanges`): per
    request its prompt and first answer (token ids); for those whose calls ran, the calls, the
    tools' results, the second prompt's encoding and the final answer, by request index;
    ``counts["continued"]`` and ``counts[status]`` as :func:`agent_rows` gives them."""

    requests: Sequence[dict]
    prompts: Sequence[np.ndarray]
    answers: Sequence[np.ndarray]
    calls: dict[int, list]
    results: dict[int, list[ToolResult]]
    second: dict[int, object]
    finals: dict[int, np.ndarray]
    counts: dict[str, int]


def agent_exchanges(
    tokenizer: Tokenizer,
    requests: Sequence[dict],
    prompts: Sequence[np.ndarray],
    answers: Sequence[np.ndarray],
    *,
    tools: Toolbox | None,
    answer: Callable[[list[np.ndarray]], list[np.ndarray]],
    max_length: int,
    tool_format: ToolFormat = HERMES,
) -> Exchanges:
    """The teacher's ``answers`` to ``requests`` carried through the loop: an answer that makes
    calls (read in ``tool_format``) has them run by ``tools``; the results (or the error a refused,
    raising or stopped call gives) follow as ``tool`` messages and the teacher answers them
    (``answer(prompts) -> answers``). An answer without calls, or when there are no ``tools``, or
    whose second prompt would take ``max_length`` tokens or more, stays one turn."""
    counts: collections.Counter = collections.Counter()
    second, calls_of, results_of = {}, {}, {}
    if tools is not None:
        for i, (req, a) in enumerate(zip(requests, answers)):
            calls = tool_format.read(tokenizer.decode(a), tokenizer.special_token_texts).calls
            if not calls:
                continue
            results = [tools.call(name, args) for name, args in calls]
            counts.update(r.status for r in results)
            msgs = list(req["messages"]) + [tool_format.message(calls), *tool_messages(calls, results)]
            enc = encode_chat(tokenizer, msgs, tools=req.get("tools"), add_generation_prompt=True)
            if len(enc.ids) < max_length:
                second[i], calls_of[i], results_of[i] = enc, calls, results
    finals = dict(zip(second, answer([enc.ids for enc in second.values()]))) if second else {}
    counts["continued"] = len(finals)
    return Exchanges(requests, prompts, answers, calls_of, results_of, second, finals, dict(counts))


def exchange_rows(ex: Exchanges, *, max_length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training rows of ``ex`` as the teacher's tokens: each request's prompt and answer, or the
    whole exchange where its calls ran (learned on both assistant turns, never on the tools'
    results); cut at ``max_length``; rows left with nothing to learn are left out."""
    ids, learn = [], []
    for i, (p, a) in enumerate(zip(ex.prompts, ex.answers)):
        if i in ex.finals:
            seq = np.concatenate([ex.second[i].ids, ex.finals[i]]).astype(np.int32)
            mask = np.concatenate([ex.second[i].assistant_mask, np.ones(len(ex.finals[i]), bool)])
        else:
            seq = np.concatenate([p, a]).astype(np.int32)
            mask = np.arange(len(seq)) >= len(p)
        seq, mask = seq[:max_length], mask[:max_length]
        if mask.any():
            ids.append(seq)
            learn.append(mask)
    return ids, learn


def exchange_conversations(ex: Exchanges, tokenizer: Tokenizer, tool_format: ToolFormat = HERMES) -> list[dict]:
    """``ex`` as conversations (chat messages, the request's ``tools`` kept): the request's messages,
    then the teacher's turns as the agent loop reads them (its calls as parsed, the tools' results,
    its final answer). Another tokenizer's chat template renders them (a student that does not
    share the teacher's vocabulary learns from their text)."""
    specials = tokenizer.special_token_texts

    def turn(tokens) -> dict:
        read = tool_format.read(tokenizer.decode(tokens), specials)
        return (
            tool_format.message(read.calls, read.content)
            if read.calls
            else {"role": "assistant", "content": read.content}
        )

    out = []
    for i, (req, a) in enumerate(zip(ex.requests, ex.answers)):
        msgs = list(req["messages"])
        if i in ex.finals:
            msgs += [
                tool_format.message(ex.calls[i], tool_format.read(tokenizer.decode(a), specials).content),
                *tool_messages(ex.calls[i], ex.results[i]),
                turn(ex.finals[i]),
            ]
        else:
            msgs.append(turn(a))
        out.append({**req, "messages": msgs})
    return out


def agent_rows(
    tokenizer: Tokenizer,
    requests: Sequence[dict],
    prompts: Sequence[np.ndarray],
    answers: Sequence[np.ndarray],
    *,
    tools: Toolbox | None,
    answer: Callable[[list[np.ndarray]], list[np.ndarray]],
    max_length: int,
    tool_format: ToolFormat = HERMES,
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Training rows from the teacher's answers to requests, carried through the agent loop
    (:func:`agent_exchanges`, :func:`exchange_rows`): its row is the whole exchange, learned on
    both assistant turns and never on the tool results.

    Returns ``(ids, learn, counts)``: ``counts["continued"]`` rows went through the tools, and
    ``counts[status]`` calls ended with each :class:`~jkd.agents.tools.ToolResult` status.
    """
    ex = agent_exchanges(
        tokenizer,
        requests,
        prompts,
        answers,
        tools=tools,
        answer=answer,
        max_length=max_length,
        tool_format=tool_format,
    )
    return (*exchange_rows(ex, max_length=max_length), ex.counts)
