"""Tool-call metrics on hand-worked turns."""

import json

import pytest

from jkd.agents.formats import HERMES
from jkd.evaluate.toolcalls import tool_metrics


def call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


def block(name, **args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


WEATHER = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Oslo", date="2026-12-02")]}
TIMER = {"role": "assistant", "content": "", "tool_calls": [call("set_timer", minutes=5, label="tea")]}
NO_TOOL = {"role": "assistant", "content": "Hello!"}
RESULT_CTX = [
    {"role": "user", "content": "x"},
    WEATHER,
    {"role": "tool", "content": '{"temperature_c": -3, "condition": "snowy"}'},
]
FINAL = {"role": "assistant", "content": "In Oslo it will be -3 degrees and snowy."}


def test_read_turn():
    got = HERMES.read("Sure. " + block("f", a=1) + "\n<tool_call>\n{not json}\n</tool_call><|im_end|>", ["<|im_end|>"])
    assert (got.content, got.calls, got.attempts, got.invalid) == ("Sure.", [("f", {"a": 1})], 2, 1)
    assert HERMES.read('<tool_call>\n{"name": "f", "arguments": {}').attempts == 1  # cut short: invalid


def test_metrics_by_hand():
    turns = [
        (WEATHER, [], block("get_weather", city="Oslo", date="2026-12-02")),  # exact
        (TIMER, [], block("set_timer", minutes=6, label="tea")),  # right tool, 1 of 2 args
        (WEATHER, [], block("search_flights", origin="Berlin")),  # wrong tool
        (TIMER, [], "I cannot."),  # missed call
        (NO_TOOL, [], block("set_timer", minutes=1, label="x")),  # call where none is needed
        (NO_TOOL, [], "Hi!"),  # right: no call
        (FINAL, RESULT_CTX, "In Oslo: -3 degrees, snowy."),  # states both values
        (FINAL, RESULT_CTX, "In Oslo it is snowy."),  # misses -3
        (TIMER, [], "<tool_call>\n{broken\n</tool_call>"),  # invalid JSON
    ]
    m = tool_metrics(turns)
    assert m["tool_call_turns"] == 5 and m["turns"] == 9 and m["final_answer_turns"] == 2
    assert m["tool_call_exact_match"] == pytest.approx(1 / 5)
    assert m["tool_name_accuracy"] == pytest.approx(2 / 5)
    assert m["argument_accuracy"] == pytest.approx((2 + 1 + 0 + 0 + 0) / 10)
    assert m["tool_call_parse_rate"] == pytest.approx(4 / 5)  # 5 calls begun, 4 parse
    assert m["tool_call_precision"] == pytest.approx(2 / 4)  # 4 valid calls, 2 to a right tool
    assert m["tool_call_recall"] == pytest.approx(2 / 5)
    assert m["final_answer_correct"] == pytest.approx(1 / 2)
    assert m["no_tool_accuracy"] == pytest.approx(3 / 4)  # NO_TOOL x2 and FINAL x2


def test_values_compare_as_bfcl_does():
    turns = [
        (TIMER, [], block("set_timer", minutes=5.0, label="Tea")),  # 5.0 is 5; case does not count
        (TIMER, [], block("set_timer", minutes="5", label="tea")),  # a string is not a number
        (TIMER, [], block("set_timer", minutes=5, label="tea", x=1)),
    ]  # an argument more
    m = tool_metrics(turns)
    assert m["tool_call_exact_match"] == pytest.approx(1 / 3)
    assert m["argument_accuracy"] == pytest.approx((2 + 1 + 2) / 6)


def test_empty_denominators_are_none():
    m = tool_metrics([(NO_TOOL, [], "Hello!")])
    assert m["tool_call_exact_match"] is None and m["tool_call_parse_rate"] is None and m["tool_call_precision"] is None
    assert m["no_tool_accuracy"] == 1.0


def test_final_answer_states_what_the_reference_states_of_the_result():
    ctx = [
        {"role": "user", "content": "x"},
        TIMER,
        {"role": "tool", "content": '{"delivered": true, "id": 7, "at": "09:05"}'},
    ]
    ref = {"role": "assistant", "content": "Your timer ends at 09:05."}  # states "09:05", not the id
    m = tool_metrics(
        [
            (ref, ctx, "It ends at 09:05."),
            (ref, ctx, "Done, id 7."),
            (ref, ctx, ""),
            (ref, ctx, "09:05 " + block("set_timer", minutes=5, label="tea")),
        ]
    )
    assert m["final_answer_correct"] == pytest.approx(1 / 4)
