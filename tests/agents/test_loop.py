"""The teacher's answers carried through the agent loop: rows with the tool's result, learned on the
assistant turns only."""

import json

import numpy as np

from jkd.data import toolchat
from jkd.data.chat import encode_chat, render_chat
from jkd.data.tokenizer import byte_tokenizer
from jkd.agents.loop import agent_rows

TOK = byte_tokenizer()


def _ids(text):
    return TOK.encode(text)


def test_a_call_gets_the_result_and_the_final_answer():
    requests = [
        {"messages": [{"role": "user", "content": "tea timer 5 min"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "timer"}]},
    ]
    prompts = [encode_chat(TOK, r["messages"], add_generation_prompt=True).ids for r in requests]
    call = {"name": "set_timer", "arguments": {"minutes": 5, "label": "tea"}}
    answers = [
        _ids("<tool_call>\n" + json.dumps(call) + "\n</tool_call><|im_end|>"),
        _ids("Hello!<|im_end|>"),
        _ids('<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5}}\n</tool_call><|im_end|>'),
    ]
    asked = []

    def answer(ps):
        asked.append(len(ps))
        return [_ids("Your tea timer ends at 09:05.<|im_end|>") for _ in ps]

    ids, learn, counts = agent_rows(
        TOK, requests, prompts, answers, tools=toolchat.simulated_tools(), answer=answer, max_length=400
    )
    assert counts == {"ok": 1, "refused": 1, "continued": 2} and asked == [2]
    result = toolchat.execute("set_timer", call["arguments"])
    full = requests[0]["messages"] + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "name": "set_timer", "content": json.dumps(result)},
        {"role": "assistant", "content": "Your tea timer ends at 09:05."},
    ]
    assert TOK.decode(ids[0]) == render_chat(TOK, full).rstrip("\n")
    learned = TOK.decode(ids[0][learn[0]])
    assert learned == (
        "<tool_call>\n" + json.dumps(call) + "\n</tool_call><|im_end|>Your tea timer ends at 09:05.<|im_end|>"
    )
    assert json.dumps(result) not in learned  # the tool's result is read, never learned
    # the refused call (no label) gets the schema's complaint as the tool's result, and the answer to it
    refused = TOK.decode(ids[2])
    assert '"content": "error: set_timer: missing argument(s) label' not in refused  # a message, not JSON
    assert "error: set_timer: missing argument(s) label; it takes minutes, label" in refused
    assert refused.endswith("Your tea timer ends at 09:05.<|im_end|>")
    for k in (1,):  # a one-turn row: prompt + answer, learned on the answer
        np.testing.assert_array_equal(ids[k], np.concatenate([prompts[k], answers[k]]))
        assert learn[k].sum() == len(answers[k]) and not learn[k][: len(prompts[k])].any()


def test_without_a_simulator_or_room_nothing_is_carried_on():
    requests = [{"messages": [{"role": "user", "content": "tea timer 5 min"}]}]
    prompts = [encode_chat(TOK, requests[0]["messages"], add_generation_prompt=True).ids]
    answers = [_ids('<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5, "label": "tea"}}\n</tool_call>')]
    never = lambda ps: (_ for _ in ()).throw(AssertionError("no second round expected"))  # noqa: E731
    for kw in ({"tools": None, "max_length": 400}, {"tools": toolchat.simulated_tools(), "max_length": 60}):
        ids, learn, counts = agent_rows(TOK, requests, prompts, answers, answer=never, **kw)
        assert counts["continued"] == 0 and len(ids[0]) == min(len(prompts[0]) + len(answers[0]), kw["max_length"])


def test_the_exchanges_as_conversations_render_as_their_rows():
    """What a student of another tokenizer learns from: the exchanges as chat messages, which the
    teacher's own template renders back into the very rows the teacher's tokens give."""
    from jkd.agents.loop import agent_exchanges, exchange_conversations, exchange_rows

    requests = [
        {"messages": [{"role": "user", "content": "tea timer 5 min"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    prompts = [encode_chat(TOK, r["messages"], add_generation_prompt=True).ids for r in requests]
    call = {"name": "set_timer", "arguments": {"minutes": 5, "label": "tea"}}
    answers = [_ids("<tool_call>\n" + json.dumps(call) + "\n</tool_call><|im_end|>"), _ids("Hello!<|im_end|>")]
    ex = agent_exchanges(
        TOK,
        requests,
        prompts,
        answers,
        tools=toolchat.simulated_tools(),
        max_length=400,
        answer=lambda ps: [_ids("Your tea timer ends at 09:05.<|im_end|>") for _ in ps],
    )
    convs = exchange_conversations(ex, TOK)
    assert convs[1]["messages"] == requests[1]["messages"] + [{"role": "assistant", "content": "Hello!"}]
    assert [m["role"] for m in convs[0]["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert convs[0]["messages"][1]["tool_calls"][0]["function"] == call
    ids, learn = exchange_rows(ex, max_length=400)
    for conv, row, mask in zip(convs, ids, learn):
        enc = encode_chat(TOK, conv["messages"])  # the template closes the last turn with a newline
        assert TOK.decode(enc.ids[len(row) :]) == "\n" and not enc.assistant_mask[len(row) :].any()
        np.testing.assert_array_equal(enc.ids[: len(row)], row)
        np.testing.assert_array_equal(enc.assistant_mask[: len(row)], mask)
