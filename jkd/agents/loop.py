"""The agent loop: a model's calls run through the tools, their results go back to it.

:func:`agent_rows` carries the teacher's answers to requests through the loop for sequence-level
distillation: each answer's calls run (:meth:`jkd.agents.tools.Toolbox.call`), the results
(or what went wrong) join the conversation as ``tool`` messages, and the teacher answers them.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np

from jkd.agents.formats import HERMES, ToolFormat
from jkd.agents.tools import ToolResult, Toolbox
from jkd.data.chat import encode_chat
from jkd.data.tokenizer import Tokenizer


def tool_messages(calls: Sequence[tuple[str, dict]], results: Sequence[ToolResult]) -> list[dict]:
    """The ``tool`` messages that give ``results`` back to the model, one per call, in order."""
    return [{"role": "tool", "name": name, "content": r.content} for (name, _), r in zip(calls, results)]


def agent_rows(tokenizer: Tokenizer, requests: Sequence[dict], prompts: Sequence[np.ndarray],
               answers: Sequence[np.ndarray], *, tools: Toolbox | None,
               answer: Callable[[list[np.ndarray]], list[np.ndarray]], max_length: int,
               tool_format: ToolFormat = HERMES) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Training rows from the teacher's answers to requests, carried through the agent loop.

    An answer that makes calls (read in ``tool_format``) has them run by ``tools``; the results
    (or the error a refused, raising or stopped call gives) follow as ``tool`` messages and the
    teacher answers them (``answer(prompts) -> answers``); its row is the whole exchange, learned on
    both assistant turns and never on the tool results. An answer without calls, or when there are
    no ``tools``, or whose second prompt would take ``max_length`` tokens or more, stays one turn.

    Returns ``(ids, learn, counts)``: ``counts["continued"]`` rows went through the tools, and
    ``counts[status]`` calls ended with each :class:`~jkd.agents.tools.ToolResult` status.
    """
    counts: collections.Counter = collections.Counter()
    second: list[tuple[int, object]] = []
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
                second.append((i, enc))
    finals = dict(zip((i for i, _ in second), answer([enc.ids for _, enc in second]))) if second else {}
    encs = dict(second)
    ids, learn = [], []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if i in finals:
            seq = np.concatenate([encs[i].ids, finals[i]]).astype(np.int32)
            mask = np.concatenate([encs[i].assistant_mask, np.ones(len(finals[i]), bool)])
        else:
            seq = np.concatenate([p, a]).astype(np.int32)
            mask = np.arange(len(seq)) >= len(p)
        seq, mask = seq[:max_length], mask[:max_length]
        if mask.any():
            ids.append(seq)
            learn.append(mask)
    counts["continued"] = len(finals)
    return ids, learn, dict(counts)
