"""Tool-call formats: how a model family writes a call in its turn, and how to read it back.

A chat template renders an assistant message's ``tool_calls`` in its family's format; a model
generates calls in the same format. Each :class:`ToolFormat` parses generated text (decoded with
special tokens *kept*: Mistral's ``[TOOL_CALLS]`` and Llama's ``<|python_tag|>`` are special
tokens, lost when they are dropped) into a :class:`ParsedTurn`: the calls as ``(name, arguments)``
pairs, the text outside them, and how many call attempts it saw (an attempt that does not parse is
an invalid call, never silently nothing).

The formats:

- :data:`HERMES`: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes,
  Qwen2.5, Qwen3, SmolLM);
- :data:`LLAMA3_JSON`: a JSON object ``{"name": ..., "parameters": {...}}`` as the whole turn,
  after ``<|python_tag|>`` or alone (Llama 3.1-3.3); several are separated by ``;``;
- :data:`MISTRAL`: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` objects, or
  (newer templates) ``[TOOL_CALLS]name[ARGS]{...}`` per call;
- :data:`PLAIN_JSON`: the turn is a JSON object (or list of them) with a ``name`` and
  ``arguments`` or ``parameters``, in a fenced code block or bare: the fallback;
- :class:`TemplateFormat`: any other layout, learned from the template by :func:`detect_format`.

:func:`detect_format` renders a known call through a chat template and picks the format that
reads it back; ``--tool-format`` names one instead (:func:`by_name`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

Call = tuple[str, dict[str, Any]]

_DECODER = json.JSONDecoder()
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


class ToolFormatError(ValueError):
    """A chat template whose tool calls jkd cannot read back, or an unknown format name."""


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """A generated turn read by a format: ``calls`` that parsed, ``attempts`` (calls the format saw
    begin, parsed or not) and ``content`` (the text outside them)."""

    content: str
    calls: list[Call]
    attempts: int

    @property
    def invalid(self) -> int:
        return self.attempts - len(self.calls)


def _call(obj: Any, keys: Sequence[str] = ("arguments",)) -> Call | None:
    """``(name, arguments)`` of ``{"name": str, <key>: object}``; arguments given as a JSON string
    are read once. None when ``obj`` is not such a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            return (obj["name"], args) if isinstance(args, dict) else None
    return None


def message_calls(message: dict) -> list[Call]:
    """``[(name, arguments)]`` of a chat message's ``tool_calls`` (JSON-string arguments read)."""
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        out.append((fn["name"], json.loads(args) if isinstance(args, str) else args))
    return out


def _json_at(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``pos`` (whitespace skipped) and where it ends, or None."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None


class ToolFormat:
    """A family's tool-call format. ``name``: what ``--tool-format`` calls it;
    ``arguments_as_string``: the family's templates take arguments as a JSON string, not an object."""

    name: str = ""
    arguments_as_string: bool = False
    markers: tuple[str, ...] = ()  # special tokens the format writes calls with

    def parse(self, text: str) -> ParsedTurn:
        raise NotImplementedError

    def read(self, text: str, special_tokens: Sequence[str] = ()) -> ParsedTurn:
        """``text`` (decoded with special tokens kept) read by the format: the ``special_tokens``
        other than its own markers (turn ends, headers) are dropped first."""
        for tok in special_tokens:
            if tok not in self.markers:
                text = text.replace(tok, "")
        return self.parse(text)

    def message(self, calls: Sequence[Call], content: str = "") -> dict:
        """The assistant message making ``calls``, as chat templates take it."""
        return {
            "role": "assistant",
            "content": content,
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": n, "arguments": json.dumps(a) if self.arguments_as_string else a},
                }
                for n, a in calls
            ],
        }

    def prepare(self, conversation: dict) -> dict:
        """``conversation`` with its calls' arguments as the family's templates take them (JSON
        strings with ``arguments_as_string``, else objects); itself when nothing changes."""
        if not any(m.get("tool_calls") for m in conversation["messages"]):
            return conversation
        msgs = []
        for m in conversation["messages"]:
            if m.get("tool_calls"):
                calls = [
                    (c.get("function", c)["name"], _arguments(c.get("function", c).get("arguments", {})))
                    for c in m["tool_calls"]
                ]
                m = {**m, **{k: v for k, v in self.message(calls).items() if k == "tool_calls"}}
            msgs.append(m)
        return {**conversation, "messages": msgs}

    def __repr__(self) -> str:
        return f"<tool format {self.name}>"


def _arguments(args: Any) -> Any:
    return json.loads(args) if isinstance(args, str) else args


class _Hermes(ToolFormat):
    name = "hermes"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedTurn:
        calls, attempts = [], 0
        for m in self._BLOCK.finditer(text):
            attempts += 1
            got = _json_at(m.group(1), 0)
            call = _call(got[0]) if got and not m.group(1)[got[1] :].strip() else None
            if call is not None:
                calls.append(call)
        return ParsedTurn(self._BLOCK.sub("", text).strip(), calls, attempts)


class _Llama3JSON(ToolFormat):
    name = "llama3_json"
    markers = ("<|python_tag|>",)
    _TAG = "<|python_tag|>"

    def parse(self, text: str) -> ParsedTurn:
        body = text.strip()
        tagged = body.startswith(self._TAG)
        if tagged:
            body = body[len(self._TAG) :].lstrip()
        if not tagged and not (body.startswith("{") and '"name"' in body):
            return ParsedTurn(text.strip(), [], 0)
        calls, attempts, pos = [], 0, 0
        while pos < len(body):
            attempts += 1
            got = _json_at(body, pos)
            call = _call(got[0], ("parameters", "arguments")) if got else None
            if call is None:
                break
            calls.append(call)
            pos = got[1]
            rest = body[pos:].lstrip()
            if not rest.startswith(";"):
                if rest:  # text after the call: not a call turn as the format writes one
                    calls = []
                break
            pos = len(body) - len(rest) + 1
        return ParsedTurn("", calls, max(attempts, 1))


class _Mistral(ToolFormat):
    name = "mistral"
    markers = ("[TOOL_CALLS]", "[ARGS]")
    _TAG = "[TOOL_CALLS]"

    def parse(self, text: str) -> ParsedTurn:
        at = text.find(self._TAG)
        if at < 0:
            return ParsedTurn(text.strip(), [], 0)
        content, rest = text[:at].strip(), text[at + len(self._TAG) :]
        got = _json_at(rest, 0)
        if got is not None and isinstance(got[0], list):  # [TOOL_CALLS][{...}, {...}]
            calls = [_call(c) for c in got[0]]
            good = [c for c in calls if c is not None]
            return ParsedTurn(content, good, max(len(calls), 1))
        calls, attempts = [], 0  # [TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}
        for piece in rest.split(self._TAG):
            attempts += 1
            name, sep, args = piece.partition("[ARGS]")
            got = _json_at(args, 0) if sep else None
            if got is not None and _NAME.fullmatch(name.strip()) and isinstance(got[0], dict):
                calls.append((name.strip(), got[0]))
        return ParsedTurn(content, calls, attempts)


class _PlainJSON(ToolFormat):
    name = "json"
    _FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)

    def parse(self, text: str) -> ParsedTurn:
        body = text.strip()
        fenced = self._FENCE.match(body)
        if fenced:
            body = fenced.group(1)
        if not body.startswith(("{", "[")) or '"name"' not in body:
            return ParsedTurn(text.strip(), [], 0)
        got = _json_at(body, 0)
        if got is None or body[got[1] :].strip():
            return ParsedTurn("", [], 1)
        objs = got[0] if isinstance(got[0], list) else [got[0]]
        calls = [_call(o, ("arguments", "parameters")) for o in objs]
        return ParsedTurn("", [c for c in calls if c is not None], max(len(objs), 1))


HERMES, LLAMA3_JSON, MISTRAL, PLAIN_JSON = _Hermes(), _Llama3JSON(), _Mistral(), _PlainJSON()
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL, PLAIN_JSON)}


@dataclasses.dataclass(frozen=True, repr=False)
class TemplateFormat(ToolFormat):
    """A layout read off a template: each call is ``head NAME infix ARGUMENTS tail`` (literal
    ``head``, ``infix`` and ``tail``; the arguments a JSON object)."""

    head: str
    infix: str
    tail: str
    arguments_as_string: bool = False
    markers: tuple[str, ...] = ()
    name: str = "template"

    def parse(self, text: str) -> ParsedTurn:
        calls, attempts, spans, pos = [], 0, [], 0
        while True:
            at = text.find(self.head, pos)
            if at < 0:
                break
            attempts += 1
            pos = at + len(self.head)
            m = _NAME.match(text, pos)
            if m is None or not text.startswith(self.infix, m.end()):
                continue
            got = _json_at(text, m.end() + len(self.infix))
            if got is None or not isinstance(got[0], dict):
                continue
            end = got[1]
            rest = text[end:]
            if self.tail.strip() and rest.lstrip().startswith(self.tail.strip()):
                end = len(text) - len(rest.lstrip()) + len(self.tail.strip())
            calls.append((m.group(0), got[0]))
            spans.append((at, end))
            pos = end
        content = text
        for s, e in reversed(spans):
            content = content[:s] + content[e:]
        return ParsedTurn(content.strip(), calls, attempts)


# ---- detection ------------------------------------------------------------------------------------

_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "jkd_probe",
        "description": "A probe.",
        "parameters": {"type": "object", "required": ["jkd_arg"], "properties": {"jkd_arg": {"type": "string"}}},
    },
}
_PROBES: list[Call] = [("jkd_probe", {"jkd_arg": "jkd_value"}), ("jkd_probe_two", {"jkd_arg": "jkd_other"})]


def _rendered_turn(tokenizer, calls: Sequence[Call], as_string: bool, chat_template: str | None) -> str:
    """What the template writes for an assistant turn making ``calls`` (after the generation prompt)."""
    from jkd.data.chat import render_chat

    user = [{"role": "user", "content": "jkd probe request"}]
    msg = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": n, "arguments": json.dumps(a) if as_string else a}}
            for n, a in calls
        ],
    }
    full = render_chat(tokenizer, user + [msg], tools=[_PROBE_TOOL], chat_template=chat_template)
    head = render_chat(tokenizer, user, tools=[_PROBE_TOOL], add_generation_prompt=True, chat_template=chat_template)
    return (
        full[len(head) :]
        if full.startswith(head)
        else full[full.find("jkd probe request") + len("jkd probe request") :]
    )


def detect_format(tokenizer, *, chat_template: str | None = None) -> ToolFormat:
    """The format ``tokenizer``'s chat template writes tool calls in: a probe call is rendered (its
    arguments as an object, then as a JSON string) and the first format of :data:`FORMATS` that
    reads it back exactly is chosen; otherwise a :class:`TemplateFormat` is read off the rendering.
    Raises :class:`ToolFormatError` when the template does not write the call at all."""
    one, two = _PROBES[:1], _PROBES
    specials = tokenizer.special_token_texts
    for as_string in (False, True):
        text = _rendered_turn(tokenizer, one, as_string, chat_template)
        if "jkd_probe" not in text or ("jkd_value" not in text):
            continue
        if as_string is False and "'jkd_arg'" in text:
            continue  # the template printed a Python dict: it expects a JSON string
        for fmt in FORMATS.values():
            if fmt.read(text, specials).calls == one:
                return _with_string_args(fmt, as_string)
        learned = _learn(text, _rendered_turn(tokenizer, two, as_string, chat_template), as_string, specials)
        if learned is not None and learned.read(text, specials).calls == one:
            return learned
    rendered = _rendered_turn(tokenizer, one, False, chat_template)
    if "jkd_probe" not in rendered:
        raise ToolFormatError(
            f"the chat template writes no tool calls (an assistant turn with a call renders as {rendered[:200]!r})"
        )
    raise ToolFormatError(
        f"the chat template writes tool calls in a form jkd cannot read back ({rendered[:200]!r}); pass "
        f"--tool-format with one of {', '.join(FORMATS)}"
    )


def _with_string_args(fmt: ToolFormat, as_string: bool) -> ToolFormat:
    if not as_string:
        return fmt
    out = type(fmt)()
    out.arguments_as_string = True
    return out


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _learn(one: str, two: str, as_string: bool, specials: Sequence[str]) -> TemplateFormat | None:
    """head / infix / tail from the renderings of one probe call and of two."""
    args = json.dumps(_PROBES[0][1])
    name_at = one.find("jkd_probe")
    args_at = one.find(args, name_at)
    if name_at < 0 or args_at < 0:
        return None
    prefix, infix, suffix = one[:name_at], one[name_at + len("jkd_probe") : args_at], one[args_at + len(args) :]
    first_end = two.find(args) + len(args) if args in two else -1
    second = two.find("jkd_probe_two")
    between = two[first_end:second] if 0 <= first_end <= second else ""
    head = ""
    for n in range(min(len(between), len(prefix)), 0, -1):  # the per-call opener: between's end, prefix's end
        if between.endswith(prefix[-n:]):
            head = prefix[-n:]
            break
    head = head or prefix.strip()
    if not head.strip():
        return None
    sep = between[: len(between) - len(head)] if head and between.endswith(head) else between
    tail = _common_prefix(sep, suffix)  # what closes a call: the separator's start, the suffix's too
    head = head.lstrip()
    return TemplateFormat(
        head=head,
        infix=infix,
        tail=tail,
        arguments_as_string=as_string,
        markers=tuple(t for t in specials if t in head + infix + tail),
    )


def by_name(name: str) -> ToolFormat:
    """The format ``name`` (one of :data:`FORMATS`)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ToolFormatError(
            f"unknown tool-call format {name!r}; the formats are {', '.join(FORMATS)} "
            "(or leave it out: it is read off the chat template)"
        ) from None


def tool_format_for(
    tokenizer, name: str | None, conversations: Sequence[dict] = ()
) -> tuple[ToolFormat, str, str | None]:
    """The format a run reads tool calls in, how it was chosen, and a warning (or None): ``name``
    when given, else read off ``tokenizer``'s chat template (:func:`detect_format`). A template
    that writes no tool calls gets :data:`PLAIN_JSON`, with a warning when ``conversations`` make
    calls that it drops."""
    if name is not None:
        return by_name(name), "named with --tool-format", None
    try:
        return detect_format(tokenizer), "read off the chat template", None
    except ToolFormatError:
        calls = sum(len(m.get("tool_calls") or []) for c in conversations for m in c["messages"])
        warning = (
            f"the chat template writes no tool calls, so the {calls} calls in the conversations are left out "
            "of what the models read and learn; use a model folder whose chat template renders tool_calls"
            if calls
            else None
        )
        return PLAIN_JSON, "the chat template writes no tool calls", warning
