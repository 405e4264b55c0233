"""Tool-call formats: each family's template renders a call (as ``transformers`` renders it), the
format detected from the template reads it back; generated turns are scored in their own format."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from jkd.agents.formats import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    PLAIN_JSON,
    TemplateFormat,
    ToolFormatError,
    by_name,
    detect_format,
    tool_format_for,
)
from jkd.data.chat import render_chat
from jkd.data.tokenizer import Tokenizer, byte_tokenizer
from jkd.evaluate.toolcalls import format_warning, tool_metrics

transformers = pytest.importorskip("transformers")

# Templates written for these tests, each in one family's layout of tool calls.
LLAMA31 = """{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>

{% if message.tool_calls %}{% for call in message.tool_calls %}{% set fn = call.function %}{{ '{"name": "' + fn.name + '", "parameters": ' }}{{ fn.arguments | tojson }}{{ '}' }}{% if not loop.last %}; {% endif %}{% endfor %}<|eom_id|>
{%- else %}{{ message.content | trim }}<|eot_id|>{% endif %}
{%- else %}<|start_header_id|>{{ 'ipython' if message.role == 'tool' else message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

MISTRAL_T = """{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'user' %}[INST] {{ message.content }}[/INST]
{%- elif message.role == 'assistant' %}
{%- if message.tool_calls %}[TOOL_CALLS][{% for call in message.tool_calls %}{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}
{%- else %}{{ message.content }}{{ eos_token }}{% endif %}
{%- elif message.role == 'tool' %}[TOOL_RESULTS] {{ message.content }}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}"""

# A template that takes arguments as JSON strings (it prints them as they are).
STRING_ARGS = """{%- for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{% for call in message.tool_calls or [] %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments }}}
</tool_call>{% endfor %}{{ message.content or '' }}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# A layout no named format reads: the tool's name, a space, the arguments.
CUSTOM = """{%- for message in messages %}
{%- if message.role == 'assistant' %}A: {% for call in message.tool_calls or [] %}<tool_call>{{ call.function.name }} {{ call.function.arguments | tojson }}</tool_call>{% endfor %}{{ message.content or '' }}<|im_end|>
{% else %}{{ message.role }}: {{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}A: {% endif %}"""

SPECIALS = [
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
]
CORPUS = ['{"name": "add", "arguments": {"a": 5, "b": 33}} {"parameters": 1} what is five plus thirty-three'] * 20


@pytest.fixture(scope="module")
def backend():
    b = Backend(models.BPE())
    b.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    b.decoder = decoders.ByteLevel()
    b.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return b


def tok(backend, template, bos="<|begin_of_text|>", eos="<|eot_id|>"):
    return Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=template)


FAMILIES = {  # template, tokens, the format that must be detected
    "hermes": (byte_tokenizer().chat_template, dict(bos=None, eos="<|im_end|>"), HERMES),
    "llama3_json": (LLAMA31, {}, LLAMA3_JSON),
    "mistral": (MISTRAL_T, dict(bos="<s>", eos="</s>"), MISTRAL),
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "a + b",
        "parameters": {
            "type": "object",
            "required": ["a", "b"],
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        },
    },
}
CALLS = [("add", {"a": 5, "b": 33})]
TWO_CALLS = [("add", {"a": 5, "b": 33}), ("mul", {"x": "y", "n": [1, 2.5]})]


def conversation(calls, arguments_as_string=False):
    return [
        {"role": "user", "content": "what is five plus thirty-three"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": n, "arguments": json.dumps(a) if arguments_as_string else a}}
                for n, a in calls
            ],
        },
    ]


def turn_text(t: Tokenizer, messages) -> str:
    """What the template writes for the last (assistant) message, special tokens kept."""
    full = render_chat(t, messages, tools=[ADD])
    head = render_chat(t, messages[:-1], tools=[ADD], add_generation_prompt=True)
    assert full.startswith(head)
    return full[len(head) :]


def _hf(t: Tokenizer, path):
    t.save(path)
    return transformers.PreTrainedTokenizerFast.from_pretrained(path)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("calls", [CALLS, TWO_CALLS], ids=["one call", "two calls"])
def test_each_family_renders_as_transformers_and_reads_back(family, calls, backend, tmp_path):
    template, tokens, want = FAMILIES[family]
    t = byte_tokenizer() if family == "hermes" else tok(backend, template, **tokens)
    fmt = detect_format(t)
    assert fmt.name == want.name and not fmt.arguments_as_string
    msgs = conversation(calls)
    hf = _hf(t, tmp_path)
    assert render_chat(t, msgs, tools=[ADD]) == hf.apply_chat_template(msgs, tools=[ADD], tokenize=False)
    text = turn_text(t, msgs)
    assert fmt.read(text, t.special_token_texts).calls == calls
    # through the ids, decoded with special tokens kept: the markers survive
    ids = t.encode(text)
    assert fmt.read(t.decode(ids), t.special_token_texts).calls == calls


def test_mistral_marker_is_a_special_token_lost_when_special_tokens_are_dropped(backend):
    t = tok(backend, MISTRAL_T, bos="<s>", eos="</s>")
    ids = t.encode(turn_text(t, conversation(CALLS)))
    assert t.token_to_id("[TOOL_CALLS]") in ids.tolist()
    assert MISTRAL.parse(t.decode(ids)).calls == CALLS
    assert MISTRAL.parse(t.decode(ids, skip_special_tokens=True)).calls == []


def test_json_string_arguments_reach_each_template_as_it_expects(backend, tmp_path):
    # a template that prints arguments as they are: detected as taking JSON strings, and fed them
    t = tok(backend, STRING_ARGS, bos=None, eos="<|im_end|>")
    fmt = detect_format(t)
    assert fmt.name == "hermes" and fmt.arguments_as_string
    prepared = fmt.prepare({"messages": conversation(CALLS)})["messages"]
    assert isinstance(prepared[1]["tool_calls"][0]["function"]["arguments"], str)
    hf = _hf(t, tmp_path)
    want = hf.apply_chat_template(conversation(CALLS, arguments_as_string=True), tokenize=False)
    assert render_chat(t, prepared) == want
    assert fmt.read(turn_text(t, prepared), t.special_token_texts).calls == CALLS
    # a template that encodes them itself (tojson) gets objects: no double encoding
    q = byte_tokenizer()
    hfq = _hf(q, tmp_path / "q")
    obj = hfq.apply_chat_template(conversation(CALLS), tokenize=False)
    assert '"arguments": {"a": 5, "b": 33}' in obj
    assert HERMES.prepare({"messages": conversation(CALLS, arguments_as_string=True)})["messages"] == conversation(
        CALLS
    )


def test_a_layout_no_family_writes_is_read_off_the_template(backend):
    t = tok(backend, CUSTOM, bos=None, eos="<|im_end|>")
    fmt = detect_format(t)
    assert isinstance(fmt, TemplateFormat)
    assert (fmt.head, fmt.infix, fmt.tail) == ("<tool_call>", " ", "</tool_call>")
    text = '<tool_call>add {"a": 5, "b": 33}</tool_call><tool_call>mul {"x": "y", "n": [1, 2.5]}</tool_call><|im_end|>'
    got = fmt.read(text, t.special_token_texts)
    assert got.calls == TWO_CALLS and got.content == ""
    # scored in its own format, 4 exact calls of 5 read as exact (the HERMES reading scores none)
    refs = [conversation(CALLS)[1]] * 5
    texts = [turn_text(t, conversation(CALLS))] * 4 + ['<tool_call>add {"a": 5, "b": 3}</tool_call><|im_end|>']
    mine = tool_metrics([(r, [], x) for r, x in zip(refs, texts)], fmt, t.special_token_texts)
    assert mine["tool_call_exact_match"] == pytest.approx(4 / 5) and mine["tool_call_parse_rate"] == 1.0
    hermes = tool_metrics([(r, [], x) for r, x in zip(refs, texts)], HERMES, t.special_token_texts)
    assert hermes["tool_call_exact_match"] == 0.0 and hermes["tool_call_parse_rate"] == 0.0
    assert "none of the tool calls it began could be parsed in the hermes format" in format_warning(hermes, HERMES, "m")


@pytest.mark.parametrize("family", ["hermes", "llama3_json"])
def test_a_model_scores_its_own_correct_calls_as_exact_and_garbage_as_unparsed(family, backend):
    template, tokens, _ = FAMILIES[family]
    t = byte_tokenizer() if family == "hermes" else tok(backend, template, **tokens)
    fmt = detect_format(t)
    ref = conversation(CALLS)
    right = turn_text(t, ref)
    m = tool_metrics([(ref[1], ref[:1], right)] * 3, fmt, t.special_token_texts)
    assert m["tool_call_exact_match"] == 1.0 and m["tool_call_parse_rate"] == 1.0
    assert format_warning(m, fmt, "model") is None
    garbage = {
        "hermes": "<tool_call>\nadd(a=5, b=33)\n</tool_call><|im_end|>",
        "llama3_json": '<|python_tag|>{"name": "add", "parameters": {"a": 5,<|eom_id|>',
    }[family]
    g = tool_metrics([(ref[1], ref[:1], garbage)] * 3, fmt, t.special_token_texts)
    assert g["tool_call_exact_match"] == 0.0 and g["tool_call_parse_rate"] == 0.0 and g["tool_call_attempts"] == 3
    assert "none of the tool calls it began could be parsed" in format_warning(g, fmt, "model")
    silent = tool_metrics([(ref[1], ref[:1], "five plus thirty-three is 38")] * 2, fmt, t.special_token_texts)
    assert (
        silent["tool_call_parse_rate"] is None and format_warning(silent, fmt, "model") is None
    )  # no call: no format issue
    other = {"hermes": LLAMA3_JSON, "llama3_json": HERMES}[family]
    elsewhere = (
        '{"name": "add", "parameters": {"a": 5, "b": 33}}'
        if other is LLAMA3_JSON
        else '<tool_call>\n{"name": "add", "arguments": {"a": 5, "b": 33}}\n</tool_call>'
    )
    m = tool_metrics([(ref[1], ref[:1], elsewhere)] * 2, fmt, t.special_token_texts)
    assert m["tool_call_attempts"] == 0  # neither format sees the other's call begin
    assert m[f"turns_read_as_{other.name}"] == 2
    assert (
        f"2 of its turns read as calls in the {other.name} format; name that format with --tool-format "
        f"{other.name}" in format_warning(m, fmt, "model")
    )


def test_each_format_on_hand_written_generations():
    assert LLAMA3_JSON.parse(
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    ).calls == [("a", {"x": 1}), ("b", {})]
    assert LLAMA3_JSON.parse('{"name": "a", "parameters": {"x": 1}} and then some').calls == []
    assert LLAMA3_JSON.parse("It is 38.").attempts == 0
    assert MISTRAL.parse('[TOOL_CALLS]add[ARGS]{"a": 5}[TOOL_CALLS]mul[ARGS]{"b": 2}</s>').calls == [
        ("add", {"a": 5}),
        ("mul", {"b": 2}),
    ]
    assert MISTRAL.parse('Sure. [TOOL_CALLS][{"name": "add", "arguments": "{\\"a\\": 5}"}]').calls == [
        ("add", {"a": 5})
    ]
    assert MISTRAL.parse('Sure. [TOOL_CALLS][{"name": "add", "arguments": "{\\"a\\": 5}"}]').content == "Sure."
    assert PLAIN_JSON.parse('```json\n{"name": "add", "arguments": {"a": 5}}\n```').calls == [("add", {"a": 5})]
    assert PLAIN_JSON.parse('[{"name": "add", "parameters": {"a": 5}}, {"name": 3}]').attempts == 2
    got = HERMES.parse(
        'Sure. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{not json}\n</tool_call>'
    )
    assert (got.content, got.calls, got.attempts) == ("Sure.", [("f", {"a": 1})], 2)
    assert HERMES.parse('<tool_call>\n{"name": "f", "arguments": {}').attempts == 1  # cut short: an invalid call


def test_unknown_names_and_unreadable_templates_are_refused(backend):
    with pytest.raises(ToolFormatError, match="unknown tool-call format 'qwen'.*hermes, llama3_json, mistral, json"):
        by_name("qwen")
    no_tools = tok(backend, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", bos=None)
    with pytest.raises(ToolFormatError, match="writes no tool calls"):
        detect_format(no_tools)
    fmt, how, warning = tool_format_for(no_tools, None, [{"messages": conversation(TWO_CALLS)}])
    assert fmt is PLAIN_JSON and how == "the chat template writes no tool calls"
    assert warning.startswith("the chat template writes no tool calls, so the 2 calls")
    fmt, _, warning = tool_format_for(no_tools, None, [{"messages": [{"role": "user", "content": "hi"}]}])
    assert fmt is PLAIN_JSON and warning is None
    assert tool_format_for(no_tools, "mistral")[0] is MISTRAL
