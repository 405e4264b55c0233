"""Tokenizers and chat templates against ``transformers``' ``apply_chat_template``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from jkd.data.chat import ASSISTANT, OTHER, SYSTEM, TOOL, USER, ChatTemplateError, encode_chat, render_chat
from jkd.data.tokenizer import Tokenizer, byte_tokenizer

transformers = pytest.importorskip("transformers")

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A Llama-3-style template (tool results as the "ipython" role, tool calls as JSON), with the
# assistant turns in {% generation %} blocks.
LLAMA_TEMPLATE = """{{- bos_token }}
{%- if tools %}<|start_header_id|>system<|end_header_id|>

Environment: ipython
{% for t in tools %}{{ t | tojson(indent=2) }}
{% endfor %}<|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>

{% generation %}
{%- if message.tool_calls %}{% for call in message.tool_calls %}{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments | tojson }}}{% endfor %}
{%- else %}{{ message.content | trim }}{% endif %}<|eot_id|>{% endgeneration %}
{%- else %}<|start_header_id|>{{ 'ipython' if message.role == 'tool' else message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city on a date",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "date": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful agent."},
        {"role": "user", "content": "What's the weather in Paris on 2024-05-01?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "date": "2024-05-01"}},
                }
            ],
        },
        {"role": "tool", "content": '{"temp_c": 18, "sky": "clear"}'},
        {"role": "assistant", "content": "It will be 18 °C and clear in Paris."},
    ],
    [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about tokenizers."},
        {"role": "assistant", "content": "Why did the BPE merge? It couldn't stand being apart."},
    ],
]

CORPUS = [
    "What's the weather in Paris on 2024-05-01? It will be 18 °C and clear.",
    "You are a helpful agent. Tell me a joke about tokenizers, hello there, how can I help?",
    '{"name": "get_weather", "parameters": {"city": "Paris", "date": "2024-05-01"}} system user assistant',
] * 20


def trained_bpe(specials) -> Backend:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    return backend


@pytest.fixture(scope="module")
def llama_tok():
    return Tokenizer(
        trained_bpe(LLAMA_SPECIALS), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA_TEMPLATE
    )


@pytest.fixture(scope="module")
def qwen_tok():
    # The byte tokenizer's template is ChatML with Qwen 2.5's tool-call format.
    return Tokenizer(
        trained_bpe(QWEN_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=byte_tokenizer().chat_template,
    )


def _hf(tok: Tokenizer, tmp_path):
    tok.save(tmp_path)
    return transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)


@pytest.mark.parametrize("which", ["llama_tok", "qwen_tok"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("with_tools", [False, True])
def test_ids_and_assistant_mask_equal_transformers(request, which, conv, with_tools, tmp_path):
    tok = request.getfixturevalue(which)
    ref = _hf(tok, tmp_path)
    messages, tools = CONVERSATIONS[conv], TOOLS if with_tools else None
    out = ref.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mine = encode_chat(tok, messages, tools=tools)
    assert mine.ids.tolist() == list(out["input_ids"])
    np.testing.assert_array_equal(mine.assistant_mask, np.asarray(out["assistant_masks"], bool))
    assert mine.assistant_mask.sum() > 10
    assert mine.text == ref.apply_chat_template(messages, tools=tools, tokenize=False)


@pytest.mark.parametrize("which", ["llama_tok", "qwen_tok"])
def test_generation_prompt_equals_transformers(request, which, tmp_path):
    tok = request.getfixturevalue(which)
    ref = _hf(tok, tmp_path)
    messages = CONVERSATIONS[1][:3]
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    got = encode_chat(tok, messages, add_generation_prompt=True)
    assert got.ids.tolist() == list(want["input_ids"])
    assert got.roles[-3:].tolist() == [OTHER] * 3  # the assistant header is given, not learned


def test_roles_of_every_message(qwen_tok):
    """Each role's tokens decode to that role's messages (checked on the text, independently of
    how the roles were found)."""
    messages = CONVERSATIONS[0]
    enc = encode_chat(qwen_tok, messages, tools=TOOLS)
    text = {r: qwen_tok.decode(enc.ids[enc.roles == r]) for r in (SYSTEM, USER, TOOL, ASSISTANT)}
    assert "You are a helpful agent." in text[SYSTEM] and "get_weather" in text[SYSTEM]
    assert "Paris on 2024-05-01" in text[USER] and "helpful" not in text[USER]
    assert '"temp_c": 18' in text[TOOL] and "Paris on" not in text[TOOL]
    assert text[ASSISTANT] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "date": '
        '"2024-05-01"}}\n</tool_call><|im_end|>It will be 18 °C and clear in Paris.<|im_end|>'
    )


@pytest.mark.parametrize("which", ["llama_tok", "qwen_tok"])
def test_without_generation_blocks_the_prefix_method_finds_the_same_assistant_tokens(request, which):
    tok = request.getfixturevalue(which)
    plain = tok.chat_template.replace("{% generation %}", "{% if true %}").replace("{% endgeneration %}", "{% endif %}")
    for messages in CONVERSATIONS:
        marked = encode_chat(tok, messages, tools=TOOLS)
        found = encode_chat(tok, messages, tools=TOOLS, chat_template=plain)
        assert found.ids.tolist() == marked.ids.tolist()
        np.testing.assert_array_equal(found.assistant_mask, marked.assistant_mask)


def test_a_template_that_rewrites_earlier_turns_is_refused(qwen_tok):
    rewriting = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="rewrites earlier turns.*generation"):
        encode_chat(qwen_tok, CONVERSATIONS[1], chat_template=rewriting)


def test_bad_conversations_and_templates(qwen_tok):
    bare = Tokenizer(qwen_tok.backend, eos_token="<|im_end|>")
    with pytest.raises(ChatTemplateError, match="no chat template.*chat_template.jinja"):
        encode_chat(bare, CONVERSATIONS[1])
    with pytest.raises(ChatTemplateError, match="role 'robot'"):
        encode_chat(qwen_tok, [{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match="a system message must come first"):
        encode_chat(qwen_tok, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat(qwen_tok, CONVERSATIONS[1], chat_template="{% for %}")
    with pytest.raises(ValueError, match="eos_token '<\\|nope\\|>' is not in the vocabulary"):
        Tokenizer(qwen_tok.backend, eos_token="<|nope|>")
    with pytest.raises(ValueError, match=r"id 9999 is outside the vocabulary"):
        qwen_tok.decode([1, 9999])


def test_template_in_tokenizer_config_or_beside_it(qwen_tok, tmp_path):
    """Older folders keep the template in tokenizer_config.json; chat_template.jinja wins."""
    qwen_tok.save(tmp_path)
    jinja = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = jinja
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_folder(tmp_path).chat_template == jinja
    (tmp_path / "chat_template.jinja").write_text("{{ 'beside' }}")
    assert Tokenizer.from_folder(tmp_path).chat_template == "{{ 'beside' }}"
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*nowhere: no such folder"):
        Tokenizer.from_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path / "empty")


def test_byte_tokenizer(tmp_path):
    tok = byte_tokenizer()
    text = "héllo ✓ <|im_start|>user\nok<|im_end|>"
    ids = tok.encode(text)
    head = "héllo ✓ ".encode()
    assert ids[: len(head)].tolist() == list(head)  # one id per byte, id = byte value
    assert ids[len(head)] == tok.token_to_id("<|im_start|>") == 257
    assert tok.decode(ids) == text
    assert tok.vocab_size == 259 and tok.eos_id == 258 and tok.pad_id == 256
    ref = _hf(tok, tmp_path)
    assert ref(text, add_special_tokens=False)["input_ids"] == ids.tolist()
