"""The embedded tool-use conversations: deterministic, typed, varied, and self-consistent."""

import datetime
import json
import re

import pytest

from jkd.data import toolchat
from jkd.data.chat import render_chat
from jkd.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe_tokenizer

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in toolchat.TOOLS}


def _check_arguments(name, args):
    schema = SCHEMAS[name]
    assert set(args) == set(schema["required"]) == set(schema["properties"])
    for key, value in args.items():
        prop = schema["properties"][key]
        if "enum" in prop:
            assert value in prop["enum"], (name, key, value)
        if prop["type"] == "integer":
            assert isinstance(value, int) and prop["minimum"] <= value <= prop["maximum"]
        elif prop["type"] == "number":
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        else:
            assert isinstance(value, str) and value
        if prop.get("format") == "date":
            assert datetime.date.fromisoformat(value) >= toolchat.TODAY
        if "pattern" in prop:
            assert re.match(prop["pattern"], value)


def test_deterministic_and_seeded():
    a = toolchat.generate_split("train", 50, seed=3)
    assert a == toolchat.generate_split("train", 50, seed=3)
    assert a != toolchat.generate_split("train", 50, seed=4)
    assert a != toolchat.generate_split("test", 50, seed=3)  # splits are independent streams


def test_conversations_are_typed_and_consistent():
    convs = toolchat.generate_split("train", 600)
    kinds = {"tool": 0, "no_tool": 0, "ambiguous": 0}
    for c in convs:
        kinds[c["meta"]["kind"]] += 1
        roles = [m["role"] for m in c["messages"]]
        if c["meta"]["kind"] == "no_tool":
            assert roles == ["user", "assistant"]
            continue
        assert roles == ["user", "assistant", "tool", "assistant"]
        call = c["messages"][1]["tool_calls"][0]["function"]
        _check_arguments(call["name"], call["arguments"])
        result = json.loads(c["messages"][2]["content"])
        assert result == toolchat.execute(call["name"], call["arguments"])
        answer = c["messages"][3]["content"]
        for v in result.values():  # the final answer states the tool's result
            if not isinstance(v, bool):
                assert str(v) in answer, (answer, result)
    assert 0.6 < kinds["tool"] / 600 < 0.8 and kinds["no_tool"] > 50 and kinds["ambiguous"] > 50
    # every tool is used, with many phrasings per tool
    by_tool = {}
    for c in convs:
        if c["meta"]["kind"] == "tool":
            by_tool.setdefault(c["meta"]["intent"], set()).add(c["messages"][0]["content"])
    assert set(by_tool) == set(toolchat.TOOL_NAMES) and len(toolchat.TOOL_NAMES) >= 6
    assert all(len(texts) >= 30 for texts in by_tool.values())


def test_known_dates_and_amounts():
    # Tuesday 2026-12-01: "on Friday" is 2026-12-04, "on Tuesday" the next one, 2026-12-08.
    assert toolchat.TODAY.weekday() == 1
    seen = {}
    for c in toolchat.generate_split("train", 2000):
        text = c["messages"][0]["content"]
        for phrase in ("on Friday", "on Tuesday", "the day after tomorrow"):
            if c["meta"]["intent"] == "get_weather" and text.endswith(phrase + "?") is False and phrase in text:
                seen.setdefault(phrase, set()).add(c["messages"][1]["tool_calls"][0]["function"]["arguments"]["date"])
    assert seen["on Friday"] == {"2026-12-04"}
    assert seen["on Tuesday"] == {"2026-12-08"}
    assert seen["the day after tomorrow"] == {"2026-12-03"}
    assert toolchat.execute("convert_currency", {"amount": 100, "source": "EUR", "target": "USD"}) == {"amount": 108}
    assert toolchat.execute("convert_currency", {"amount": 50, "source": "USD", "target": "GBP"}) == {"amount": 39}


def test_ambiguous_requests_have_two_answers():
    names = {}
    for c in toolchat.generate_split("train", 3000):
        if c["meta"]["kind"] == "ambiguous":
            names.setdefault(c["meta"]["intent"], []).append(c["messages"][1]["tool_calls"][0]["function"]["name"])
    weather = names["check_city"].count("get_weather") / len(names["check_city"])
    assert 0.45 < weather < 0.75  # drawn with probability 0.6
    assert set(names["event_or_message"]) == {"create_event", "send_message"}


def test_unlabelled_requests_end_before_the_answer(tmp_path):
    pool = toolchat.generate_split("unlabelled", 20)
    assert all([m["role"] for m in c["messages"]] == ["user"] for c in pool)
    paths = toolchat.write_dataset(tmp_path, sizes={"train": 10, "validation": 2, "test": 3, "unlabelled": 4})
    assert len(paths["unlabelled"].read_text().splitlines()) == 4
    stamp = paths["train"].stat().st_mtime_ns
    toolchat.write_dataset(tmp_path, sizes={"train": 10, "validation": 2, "test": 3, "unlabelled": 4})
    assert paths["train"].stat().st_mtime_ns == stamp  # kept, not rewritten
    toolchat.write_dataset(tmp_path, sizes={"train": 11, "validation": 2, "test": 3, "unlabelled": 4})
    assert len(paths["train"].read_text().splitlines()) == 11
    with pytest.raises(ValueError, match="unknown split"):
        toolchat.generate_split("dev", 3)


def test_trained_bpe_is_deterministic_and_lossless(tmp_path):
    plain = byte_tokenizer()
    texts = [render_chat(plain, c["messages"]) for c in toolchat.generate_split("train", 300)]
    a, b = train_bpe_tokenizer(texts, vocab_size=400), train_bpe_tokenizer(texts, vocab_size=400)
    assert a.vocab_size == 400 and a.backend.get_vocab() == b.backend.get_vocab()
    sample = texts[0] + " 12345 Zürich?"
    assert a.decode(a.encode(sample)) == sample
    split = train_bpe_tokenizer(texts, vocab_size=400, split_digits=True)
    digits = [split.decode([i]) for i in split.encode("amount 20261201")]
    assert digits[-8:] == list("20261201")  # one token per digit
    assert len(a.encode("amount 20261201")) < len(split.encode("amount 20261201"))
    assert (
        len(a.encode("<tool_call>")) == 1
        and a.decode(a.encode("x</tool_call>"), skip_special_tokens=True) == "x</tool_call>"
    )
    a.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    assert list(again.encode(texts[1])) == list(a.encode(texts[1])) and again.eos_token == "<|im_end|>"
    assert len(a.encode(texts[0])) < len(plain.encode(texts[0])) / 1.5  # merges shorten the sequences
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts, vocab_size=100)


def test_the_simulated_tools_refuse_bad_calls():
    ok = {"minutes": 5, "label": "tea"}
    assert toolchat.execute("set_timer", ok) == {"ends_at": "09:05"}
    with pytest.raises(KeyError, match="unknown tool 'order_pizza'"):
        toolchat.execute("order_pizza", {})
    for bad, message in [
        ({"minutes": 5}, "expected the arguments"),
        ({**ok, "x": 1}, "expected the arguments"),
        ({"minutes": "5", "label": "tea"}, "minutes='5' is not a valid integer"),
        ({"minutes": True, "label": "tea"}, "not a valid integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            toolchat.execute("set_timer", bad)
    with pytest.raises(ValueError, match="not a valid string in"):
        toolchat.execute("get_weather", {"city": "Atlantis", "date": "2026-12-02"})
    with pytest.raises(ValueError, match="not a YYYY-MM-DD date"):
        toolchat.execute("get_weather", {"city": "Oslo", "date": "tomorrow"})
