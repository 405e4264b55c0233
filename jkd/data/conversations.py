"""Conversations from ``.jsonl`` files: read and checked, tokenised with roles, batched.

One line per conversation, ``{"messages": [...], "tools": [...]?}`` in the chat format Hugging Face
chat templates take (``system`` / ``user`` / ``assistant`` / ``tool`` roles; assistant
``tool_calls`` whose ``arguments`` are a dict or a JSON string). Labelled data needs an assistant
turn in every conversation; unlabelled requests (prompts) must end before an assistant turn.

The truncation rule (:data:`TRUNCATION_RULE`): a conversation longer than ``max_length`` tokens
keeps its system prompt and its last turns: the earliest turns are dropped, a whole user turn and
what follows it at a time, until the rest fits. When even the system prompt, the last user turn and
its answer do not fit, the first ``max_length`` tokens are kept (what is cut is never trained on),
and a conversation with no assistant token left is dropped. Both are counted
(:attr:`Encoded.truncated`, :attr:`Encoded.dropped`, with :attr:`Encoded.shortest_dropped`) for the
report and for the error that says how long ``max_length`` must be.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jkd.data.chat import ROLE_NAMES, encode_chat
from jkd.data.tokenizer import Tokenizer


class ConversationError(ValueError):
    """A line of a conversations file that cannot be used, named by file and line number."""


def _check_message(m, where: str) -> None:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ConversationError(f"{where}: a message must be an object with a 'role'; got {json.dumps(m)[:80]}")
    if m["role"] not in ROLE_NAMES:
        raise ConversationError(f"{where}: role {m['role']!r} is not one of {', '.join(ROLE_NAMES)}")
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        raise ConversationError(f"{where}: 'content' must be a string (or absent); got {type(content).__name__}")
    for j, call in enumerate(m.get("tool_calls") or []):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ConversationError(
                f"{where}, tool call {j}: expected {{'function': {{'name': ..., 'arguments': ...}}}}"
            )
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ConversationError(
                    f"{where}, tool call {j} ({fn['name']}): arguments are not JSON ({e.msg}): {fn['arguments'][:60]!r}"
                ) from None
        if not isinstance(args, dict):
            raise ConversationError(f"{where}, tool call {j} ({fn['name']}): arguments must be a JSON object")


def _arguments_read(m: dict) -> dict:
    """The message with its calls' JSON-string arguments read once into objects (a template that
    encodes them again would otherwise write them twice encoded)."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for call in m["tool_calls"]:
        key = "function" if "function" in call else None
        fn = call[key] if key else call
        if isinstance(fn.get("arguments"), str):
            fn = {**fn, "arguments": json.loads(fn["arguments"])}
        calls.append({**call, key: fn} if key else fn)
    return {**m, "tool_calls": calls}


def read_conversations(path: str | Path, *, labelled: bool = True) -> list[dict]:
    """Every conversation of a ``.jsonl`` file, checked; a bad line raises
    :class:`ConversationError` naming the file, the line and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such conversations file (expected .jsonl, one conversation per line)")
    out = []
    with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors write is skipped
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            line = line.rstrip("\r\n")  # an error at the end of the line is reported there, not at column 1
            try:
                conv = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversationError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            msgs = conv.get("messages") if isinstance(conv, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise ConversationError(f"{where}: expected an object with a non-empty 'messages' list")
            for i, m in enumerate(msgs):
                _check_message(m, f"{where}, message {i}")
            roles = [m["role"] for m in msgs]
            if labelled and "assistant" not in roles:
                raise ConversationError(
                    f"{where}: no assistant turn; labelled data needs at least one "
                    "(unlabelled requests go in --unlabelled)"
                )
            if not labelled and roles[-1] == "assistant":
                raise ConversationError(f"{where}: an unlabelled request must end before the assistant's answer")
            out.append({**conv, "messages": [_arguments_read(m) for m in msgs]})
    if not out:
        raise ConversationError(f"{path}: no conversations (the file is empty)")
    return out


TRUNCATION_RULE = (
    "too long: the system prompt and the last turns are kept (earliest turns dropped); if those do "
    "not fit, the first max_length tokens; no assistant token left: dropped"
)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Tokenised conversations: ``ids[i]`` int32 and ``learn[i]`` bool (assistant tokens).

    ``truncated``: conversations shortened by the truncation rule; ``dropped``: those left without
    an assistant token (not in ``ids``); ``shortest_dropped``: the fewest tokens that would have
    kept one of the dropped conversations (its kept prompt and first answer token), None if none."""

    ids: list[np.ndarray]
    learn: list[np.ndarray]
    truncated: int
    dropped: int
    shortest_dropped: int | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _last_turns(tokenizer: Tokenizer, conv: dict, max_length: int):
    """The conversation under the rule: ``(encoding, shortened, need)``. The encoding is the whole
    conversation, or its system prompt and the last turns that fit (``shortened``), or None when
    neither fits; ``need`` is then the fewest tokens any of those needs to reach an answer token."""
    msgs, tools = conv["messages"], conv.get("tools")
    enc = encode_chat(tokenizer, msgs, tools=tools)
    if len(enc.ids) <= max_length:
        return enc, False, None
    head = msgs[:1] if msgs[0]["role"] == "system" else []
    rest = msgs[len(head) :]
    need = int(np.argmax(enc.assistant_mask)) + 1 if enc.assistant_mask.any() else None
    for i in range(1, len(rest)):
        if rest[i]["role"] != "user" or not any(m["role"] == "assistant" for m in rest[i:]):
            continue
        cand = encode_chat(tokenizer, head + rest[i:], tools=tools)
        if len(cand.ids) <= max_length:
            return cand, True, None
        if cand.assistant_mask.any():
            first = int(np.argmax(cand.assistant_mask)) + 1
            need = first if need is None else min(need, first)
    return None, True, need


def encode_conversations(tokenizer: Tokenizer, conversations: Sequence[dict], *, max_length: int) -> Encoded:
    """Token ids and assistant masks under the truncation rule of the module docstring."""
    ids, learn, truncated, dropped, shortest = [], [], 0, 0, None
    for conv in conversations:
        enc, shortened, need = _last_turns(tokenizer, conv, max_length)
        truncated += shortened
        if enc is None:  # not even the last turn fits: the first max_length tokens
            enc = encode_chat(tokenizer, conv["messages"], tools=conv.get("tools"))
            if not enc.assistant_mask[:max_length].any():
                dropped += 1
                if need is not None:
                    shortest = need if shortest is None else min(shortest, need)
                continue
        ids.append(enc.ids[:max_length])
        learn.append(enc.assistant_mask[:max_length])
    return Encoded(ids, learn, truncated, dropped, shortest)


def request_prompts(tokenizer: Tokenizer, conversations: Sequence[dict]) -> list[np.ndarray]:
    """Each request (a conversation ending before the assistant's answer) as prompt ids."""
    return [
        encode_chat(tokenizer, c["messages"], tools=c.get("tools"), add_generation_prompt=True).ids
        for c in conversations
    ]


@dataclasses.dataclass(frozen=True)
class Turn:
    """One assistant turn to predict: the prompt before it and the reference message."""

    conversation: int
    prompt: np.ndarray
    reference: dict
    context: list[dict]


def assistant_turns(tokenizer: Tokenizer, conversations: Sequence[dict]) -> list[Turn]:
    """Every assistant turn of every conversation, with the conversation before it as the prompt."""
    out = []
    for c, conv in enumerate(conversations):
        msgs = conv["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i > 0:
                prompt = encode_chat(tokenizer, msgs[:i], tools=conv.get("tools"), add_generation_prompt=True).ids
                out.append(Turn(c, prompt, m, msgs[:i]))
    return out


def padded_rows(
    ids: Sequence[np.ndarray], learn: Sequence[np.ndarray], *, length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Sequences as ``[N, length]`` rows: ``tokens`` (``pad_id`` after each), ``loss_mask`` and
    ``attention_mask``; a longer sequence is cut. The one layout of unpacked rows: the training
    batches and the teacher's outputs stored for them use it alike."""
    tokens = np.full((len(ids), length), pad_id, np.int32)
    loss_mask = np.zeros((len(ids), length), bool)
    attention = np.zeros((len(ids), length), bool)
    for r, (x, y) in enumerate(zip(ids, learn)):
        m = min(len(x), length)
        tokens[r, :m], loss_mask[r, :m], attention[r, :m] = x[:m], y[:m], True
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention}


def sequence_batches(
    ids: Sequence[np.ndarray],
    learn: Sequence[np.ndarray],
    *,
    batch_size: int,
    length: int,
    pad_id: int,
    seed: int = 0,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``[batch_size, length]`` batches (``tokens``, ``loss_mask``, ``attention_mask``, and
    ``index [batch_size]``: the rows' positions in ``ids``) in a shuffled order that depends on
    ``seed`` and the epoch; ``start`` is the data position in batches (the step the fit loop resumes
    from). Rows longer than ``length`` are cut."""
    n = len(ids)
    if n < batch_size:
        raise ValueError(f"{n} sequences do not fill one batch of {batch_size}; lower the batch size")
    per_epoch = n // batch_size
    step = start
    while True:
        epoch, j = divmod(step, per_epoch)
        rows = np.random.default_rng([seed, epoch]).permutation(n)[j * batch_size : (j + 1) * batch_size]
        batch = padded_rows([ids[i] for i in rows], [learn[i] for i in rows], length=length, pad_id=pad_id)
        yield {**batch, "index": rows.astype(np.int32)}
        step += 1


def pack_plan(lengths: Sequence[int], *, rows: int, length: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """One epoch's packing: the sequences in the shuffled order of ``(seed, epoch)``, each put in
    the first of ``rows`` rows of ``length`` tokens with room for it; a sequence that fits in no row
    closes the batch and starts the next one. Returns ``batches[rows][sequence indices]``."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    batches: list[list[list[int]]] = []
    fill: list[int] = []
    for i in order:
        m = int(lengths[i])
        r = next((k for k in range(rows) if fill[k] + m <= length), None) if batches else None
        if r is None:
            batches.append([[] for _ in range(rows)])
            fill, r = [0] * rows, 0
        batches[-1][r].append(int(i))
        fill[r] += m
    return batches


def packed_batches(
    ids: Sequence[np.ndarray],
    learn: Sequence[np.ndarray],
    *,
    rows: int,
    length: int,
    pad_id: int,
    seed: int = 0,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``[rows, length]`` batches of whole sequences packed side by side (:func:`pack_plan`):
    ``tokens``, ``loss_mask``, ``attention_mask`` and ``segment_ids`` (int32: 1, 2, ... for the
    sequences of a row, 0 for padding), which keep the packed sequences from attending to each
    other and restart their positions (:meth:`jkd.models.Decoder.hidden_states`).

    A batch holds as many sequences as fit, so a step sees a fixed number of token slots rather
    than of sequences. ``start`` is the data position in batches (the step the fit loop resumes
    from); each epoch's plan depends on ``seed`` and the epoch only, so a resumed stream continues
    with the same batches."""
    lengths = np.array([len(x) for x in ids])
    if not len(lengths):
        raise ValueError("no sequences to pack")
    if lengths.max() > length:
        raise ValueError(
            f"a sequence of {lengths.max()} tokens does not fit in a packed row of {length}; "
            f"cut the sequences to at most {length} tokens or raise the packed length"
        )
    epoch, skip = 0, start
    while True:
        plan = pack_plan(lengths, rows=rows, length=length, seed=seed, epoch=epoch)
        for batch in plan[skip:]:
            tokens = np.full((rows, length), pad_id, np.int32)
            loss_mask = np.zeros((rows, length), bool)
            segments = np.zeros((rows, length), np.int32)
            for r, row in enumerate(batch):
                at = 0
                for s, i in enumerate(row, start=1):
                    m = len(ids[i])
                    tokens[r, at : at + m], loss_mask[r, at : at + m], segments[r, at : at + m] = ids[i], learn[i], s
                    at += m
            yield {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": segments > 0, "segment_ids": segments}
        skip, epoch = max(skip - len(plan), 0), epoch + 1  # `start` may lie in a later epoch
