"""Tokenizers for language models: a Hugging Face ``tokenizer.json`` through the ``tokenizers``
package, its special tokens and chat template, and a byte-level tokenizer with the same interface.

``Tokenizer.from_folder(path)`` reads what ``transformers`` writes: ``tokenizer.json``,
``tokenizer_config.json`` (special tokens; the chat template in older folders) and
``chat_template.jinja`` (where current ``transformers`` keeps it). ``byte_tokenizer()`` builds a
tokenizer with one token per byte plus ChatML specials and a built-in chat template, for data that
comes without one; it is a real ``tokenizers`` model, so it saves and reloads like any other and
``transformers`` reads the saved folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jkd.runtime.faults import missing_folder

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise ValueError(f"tokenizer_config.json: unreadable special token {value!r}")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with its special tokens and chat template.

    Args:
      backend: the ``tokenizers.Tokenizer``.
      bos_token, eos_token, pad_token: special token strings (or None).
      chat_template: a Jinja chat template as ``transformers`` uses them (or None).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_config: dict[str, Any] | None = None,
    ):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self._extra = dict(extra_config or {})
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and backend.token_to_id(tok) is None:
                raise ValueError(f"tokenizer: {name} {tok!r} is not in the vocabulary")

    # --- construction and saving -----------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not folder.is_dir():
            raise missing_folder(folder, what="tokenizer folder")
        if not path.is_file():
            found = sorted(p.name for p in folder.iterdir())[:8]
            raise FileNotFoundError(
                f"{folder}: no tokenizer.json (found {found}); jkd reads fast tokenizers "
                "(tokenizer.json), not sentencepiece .model files"
            )
        backend = tokenizers.Tokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        jinja = folder / CHAT_TEMPLATE_FILE
        if jinja.is_file():
            template = jinja.read_text()
        keep = {k: v for k, v in cfg.items() if k in ("model_max_length", "tokenizer_class", "unk_token")}
        return cls(
            backend,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            pad_token=_token_text(cfg.get("pad_token")),
            chat_template=template,
            extra_config=keep,
        )

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._extra,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        if self.chat_template is not None:
            (folder / CHAT_TEMPLATE_FILE).write_text(self.chat_template)

    # --- ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def special_tokens(self) -> dict[str, str]:
        """What chat templates receive as variables (``bos_token``, ``eos_token``, ...)."""
        out = {k: getattr(self, k) for k in ("bos_token", "eos_token", "pad_token") if getattr(self, k)}
        unk = _token_text(self._extra.get("unk_token"))
        if unk:
            out["unk_token"] = unk
        return out

    @property
    def special_token_texts(self) -> tuple[str, ...]:
        """The text of every special token (what ``decode(..., skip_special_tokens=True)`` drops)."""
        return tuple(t.content for t in self.backend.get_added_tokens_decoder().values() if t.special)

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> ids ``[T]`` int32; special tokens written in the text are recognised, none
        are added (chat templates write their own)."""
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """ids ``[T]`` and character offsets ``[T, 2]`` (start, end) into ``text``."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int64).reshape(-1, 2)

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


# ------------------------------------------------------------------------------------------------
# The byte-level tokenizer

BYTE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOOL_CALL_TAGS = ("<tool_call>", "</tool_call>")

# ChatML with tools, as Qwen2.5's template writes them; assistant turns in {% generation %}
# blocks so that transformers' assistant mask and jkd's agree.
BYTE_CHAT_TEMPLATE = """\
{%- if tools %}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each function call, return a json object within <tool_call></tool_call> tags.<|im_end|>
{% elif messages[0].role == 'system' %}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif %}
{%- elif message.role == 'user' %}
<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}
<|im_start|>assistant
{% generation %}
{%- if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
{%- if message.content or not loop.first %}
{% endif %}
{%- set fn = call.function if call.function is defined else call %}
<tool_call>
{"name": "{{ fn.name }}", "arguments": {% if fn.arguments is string %}{{ fn.arguments }}{% else %}{{ fn.arguments | tojson }}{% endif %}}
</tool_call>
{%- endfor %}<|im_end|>{% endgeneration %}{{ '\n' }}
{%- elif message.role == 'tool' %}
<|im_start|>tool
{{ message.content }}<|im_end|>
{% else %}{{ raise_exception('unknown role ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the alphabet of
    byte-level BPE): printable Latin-1 bytes map to themselves, the rest to code points 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer() -> Tokenizer:
    """One id per byte (id = byte value), then ``<|endoftext|>`` (256, padding), ``<|im_start|>``
    (257) and ``<|im_end|>`` (258, end of turn); a ChatML chat template with tool calls."""
    alphabet = bytes_to_unicode()
    backend = tokenizers.Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_SPECIALS))
    return Tokenizer(
        backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=BYTE_CHAT_TEMPLATE,
        extra_config={"model_max_length": 1 << 20},
    )


def train_bpe_tokenizer(texts, *, vocab_size: int, split_digits: bool = False) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` ids (added tokens included) learned from ``texts``, with
    the specials and chat template of :func:`byte_tokenizer`. ``split_digits``: one token per digit
    (any number spelled the same way; longer sequences); otherwise frequent numbers become single
    tokens. Deterministic: the same texts give the same vocabulary."""
    from tokenizers import trainers

    reserved = 256 + len(BYTE_SPECIALS) + len(TOOL_CALL_TAGS)
    if vocab_size <= reserved:
        raise ValueError(
            f"train_bpe_tokenizer: vocab_size must exceed the {reserved} byte, special and tool-call "
            f"tokens; got {vocab_size}"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    byte_level = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), *byte_level] if split_digits else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_CALL_TAGS),
        special_tokens=list(BYTE_SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # <tool_call> and </tool_call> as whole tokens, as Qwen's tokenizers have them (not special, so
    # decoding keeps them).
    backend.add_tokens(list(TOOL_CALL_TAGS))
    return Tokenizer(
        backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=BYTE_CHAT_TEMPLATE,
        extra_config={"model_max_length": 1 << 20},
    )
