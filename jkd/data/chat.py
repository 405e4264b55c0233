"""Chat templates rendered as ``transformers`` renders them, into token ids and a per-token role.

``encode_chat(tokenizer, messages)`` renders a conversation (``system`` / ``user`` /
``assistant`` / ``tool`` messages, assistant ``tool_calls``) with the tokenizer's Jinja chat
template in the same sandboxed environment ``transformers`` uses (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, its ``tojson``, ``raise_exception`` and ``strftime_now``),
tokenises the text, and labels every token with the role of the message it belongs to, so a loss
can be restricted to what the model must learn (``roles == ASSISTANT``).

How roles are found:

- assistant text: the template's ``{% generation %}`` blocks where it has them (the spans
  ``transformers``' ``return_assistant_tokens_mask`` uses); otherwise, for each assistant message,
  the text between the conversation rendered up to it with a generation prompt and rendered with
  it, less trailing whitespace (what a model generates after the prompt, end-of-turn token
  included);
- every other message: the text its rendering adds to the conversation before it (headers
  included); template text outside any message (a trailing generation prompt) is ``OTHER``.

The second method needs a template whose rendering of a conversation's first ``i`` messages is a
prefix of the whole; templates that rewrite earlier turns (e.g. dropping reasoning) are refused
unless they mark assistant text with ``{% generation %}``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from jkd.data.tokenizer import Tokenizer

OTHER, SYSTEM, USER, ASSISTANT, TOOL = 0, 1, 2, 3, 4
ROLE_NAMES = {
    "system": SYSTEM,
    "user": USER,
    "assistant": ASSISTANT,
    "tool": TOOL,
    "ipython": TOOL,
    "function": TOOL,
}  # Llama 3 calls tool results "ipython"

# Private-use characters that mark {% generation %} blocks during rendering; stripped after.
_OPEN, _CLOSE = "\ue000", "\ue001"


class ChatTemplateError(ValueError):
    """A conversation that the template cannot render, or a template jkd cannot label."""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body between two markers."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_wrap")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _wrap(self, caller):
        return _OPEN + caller() + _CLOSE


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise ChatTemplateError(f"chat template: {message}")


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


_ENV = None


def _environment() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        _ENV = env
    return _ENV


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The compiled template (cached: compiling costs milliseconds, rendering microseconds)."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from None


def _render_marked(tpl: jinja2.Template, variables: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the ``[start, end)`` spans of its generation blocks."""
    try:
        raw = tpl.render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from None
    text, spans, start = [], [], None
    pos = 0
    for ch in raw:
        if ch == _OPEN:
            start = pos
        elif ch == _CLOSE:
            spans.append((start, pos))
            start = None
        else:
            text.append(ch)
            pos += 1
    return "".join(text), spans


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    *,
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    chat_template: str | None = None,
    **template_kwargs,
) -> str:
    """The conversation as the chat template writes it (``transformers``' ``tokenize=False``)."""
    tpl = _compile(_template(tokenizer, chat_template))
    return _render_marked(tpl, _variables(tokenizer, messages, tools, add_generation_prompt, template_kwargs))[0]


def _template(tokenizer: Tokenizer, chat_template: str | None) -> str:
    template = chat_template or tokenizer.chat_template
    if template is None:
        raise ChatTemplateError(
            "the tokenizer has no chat template (neither chat_template.jinja nor a 'chat_template' in "
            "tokenizer_config.json); pass chat_template=... or use jkd.data.tokenizer.byte_tokenizer()"
        )
    return template


def _check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise ChatTemplateError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"message {i}: expected a dict with a 'role', got {m!r:.80}")
        if m["role"] not in ROLE_NAMES:
            raise ChatTemplateError(f"message {i}: role {m['role']!r} is not one of {sorted(ROLE_NAMES)}")


def _variables(tokenizer, messages, tools, add_generation_prompt, kwargs) -> dict[str, Any]:
    return {
        "messages": list(messages),
        "tools": list(tools) if tools else None,
        "add_generation_prompt": add_generation_prompt,
        **tokenizer.special_tokens,
        **kwargs,
    }


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """A tokenised conversation: ``ids [T]`` int32, ``roles [T]`` int8 (``OTHER``, ``SYSTEM``,
    ``USER``, ``ASSISTANT``, ``TOOL``) and the rendered ``text``."""

    ids: np.ndarray
    roles: np.ndarray
    text: str

    @property
    def assistant_mask(self) -> np.ndarray:
        """``[T]`` bool: the tokens a model must learn to produce."""
        return self.roles == ASSISTANT


def _char_roles(tpl, tokenizer, messages, tools, kwargs, full: str, spans) -> np.ndarray:
    roles = np.full(len(full), OTHER, np.int8)
    prefix_ok = True
    prev = 0
    for i, m in enumerate(messages):
        upto = _render_marked(tpl, _variables(tokenizer, messages[: i + 1], tools, False, kwargs))[0]
        if not full.startswith(upto) or len(upto) < prev:
            prefix_ok = False
            break
        role = ROLE_NAMES[m["role"]]
        if role == ASSISTANT and not spans:
            head = _render_marked(tpl, _variables(tokenizer, messages[:i], tools, True, kwargs))[0]
            if not (full.startswith(head) and prev <= len(head) <= len(upto)):
                prefix_ok = False
                break
            # Whitespace the template writes after the turn's end token is never generated.
            roles[len(head) : len(upto.rstrip())] = ASSISTANT
        elif role != ASSISTANT:
            roles[prev : len(upto)] = role
        prev = len(upto)
    if not prefix_ok:
        if not spans:
            raise ChatTemplateError(
                "this chat template rewrites earlier turns (rendering the first messages is not a prefix "
                "of the whole conversation), so jkd cannot tell which tokens each message produced; mark "
                "assistant text with {% generation %}...{% endgeneration %} in the template"
            )
        roles[:] = OTHER
    for s, e in spans:
        roles[s:e] = ASSISTANT
    return roles


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    *,
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    chat_template: str | None = None,
    **template_kwargs,
) -> ChatTokens:
    """Render and tokenise a conversation; each token gets the role of the text it starts in.

    Args:
      tokenizer: a :class:`~jkd.data.tokenizer.Tokenizer` with a chat template (or pass one).
      messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": ...,
        "tool_calls": [...]}, ...]`` as ``transformers``' chat templates take them.
      tools: JSON-schema tool descriptions, passed to the template as ``tools``.
      add_generation_prompt: end with the header that opens an assistant turn (for sampling).
      chat_template: overrides the tokenizer's template.
      template_kwargs: further template variables (e.g. ``enable_thinking=False``).
    """
    _check_messages(messages)
    tpl = _compile(_template(tokenizer, chat_template))
    variables = _variables(tokenizer, messages, tools, add_generation_prompt, template_kwargs)
    text, spans = _render_marked(tpl, variables)
    char_roles = _char_roles(tpl, tokenizer, messages, tools, template_kwargs, text, spans)
    ids, offsets = tokenizer.encode_with_offsets(text)
    roles = np.zeros(len(ids), np.int8)
    for j, (s, e) in enumerate(offsets):
        if e > s:
            seg = char_roles[s:e]
            # A token that overlaps assistant text is assistant (as transformers' mask counts it).
            roles[j] = ASSISTANT if (seg == ASSISTANT).any() else seg[0]
    return ChatTokens(ids=ids, roles=roles, text=text)
