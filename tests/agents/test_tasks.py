"""Whole tasks in the loop: a model that replays the references solves every task, each kind of
mistake fails its task, pass^k counts the tasks solved in every sample."""

from __future__ import annotations

import json

import pytest

from jkd.agents.formats import HERMES
from typing import Literal

from jkd.agents.tasks import (
    ANSWERED,
    MAX_TURNS,
    TOO_LONG,
    UNPARSED,
    Task,
    Trajectory,
    call_matches,
    run_tasks,
    same_value,
    solved,
    task_metrics,
    tasks_from,
)
from jkd.agents.tools import Toolbox
from jkd.data import toolchat
from jkd.data.chat import render_chat
from jkd.data.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
CONVS = toolchat.generate_split("test", 30, seed=0)
TASKS = tasks_from(CONVS)


def reference_turn(conv: dict, k: int) -> str:
    """The text of the conversation's k-th assistant turn after its last user message, as the template writes it."""
    msgs = conv["messages"]
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    i = turns[k]
    full = render_chat(TOK, msgs[: i + 1])
    return full[len(render_chat(TOK, msgs[:i], add_generation_prompt=True)) :].rstrip("\n")


def replaying(edit=lambda text, task, turn: text):
    """A stand-in model answering each prompt with the reference's turn (``edit`` may spoil it)."""

    def generate(prompts):
        rows = []
        for p in prompts:
            text = TOK.decode(p)
            task = next(i for i, c in enumerate(CONVS) if render_chat(TOK, c["messages"][:1]) in text)
            turn = text.count("<|im_start|>tool")
            turns = sum(m["role"] == "assistant" for m in CONVS[task]["messages"])
            rows.append(TOK.encode(edit(reference_turn(CONVS[task], turn) if turn < turns else "", task, turn)))
        return rows

    return generate


def play(generate, **kw):
    return run_tasks(
        generate,
        TOK,
        TASKS,
        **{"tools": toolchat.simulated_tools(), "tool_format": HERMES, "max_turns": 3, "max_length": 4096, **kw},
    )


def test_tasks_come_from_the_conversations():
    assert len(TASKS) == len(CONVS)
    calls = [t for t in TASKS if t.calls]
    assert calls and len(calls) < len(TASKS)  # tool tasks and no-tool tasks
    for t, c in zip(TASKS, CONVS):
        assert t.messages == c["messages"][:1] and t.answer == c["messages"][-1]["content"]


def test_replaying_the_references_solves_every_task():
    trajs = play(replaying())
    assert all(t.ended == ANSWERED for t in trajs)
    assert task_metrics(TASKS, trajs)["task_success"] == 1.0 and task_metrics(TASKS, trajs)["irrelevance"] == 1.0
    for task, traj, conv in zip(TASKS, trajs, CONVS):  # the tools' results are the reference's
        assert traj.results == [m["content"] for m in conv["messages"] if m["role"] == "tool"]


def test_each_mistake_fails_its_task():
    first_tool = next(i for i, t in enumerate(TASKS) if t.calls)
    no_tool = next(i for i, t in enumerate(TASKS) if not t.calls)

    def spoil(kind):
        def edit(text, task, turn):
            if task == first_tool and turn == 0 and kind == "argument":
                call = json.loads(text[text.index("{") : text.rindex("}") + 1])
                key = next(iter(call["arguments"]))
                call["arguments"][key] = "wrong"
                return "<tool_call>\n" + json.dumps(call) + "\n</tool_call><|im_end|>"
            if task == first_tool and turn == 1 and kind == "answer":
                return "Done.<|im_end|>"  # states none of the result's values
            if task == first_tool and turn == 0 and kind == "garbage":
                return "<tool_call>\nnot json\n</tool_call><|im_end|>"
            if task == no_tool and kind == "call":
                call = '{"name": "set_timer", "arguments": {"minutes": 1, "label": "x"}}'
                return "<tool_call>\n" + call + "\n</tool_call><|im_end|>"
            return text

        return edit

    n_tool = sum(bool(t.calls) for t in TASKS)
    n_none = len(TASKS) - n_tool
    for kind, task, ended in (
        ("argument", first_tool, ANSWERED),
        ("answer", first_tool, ANSWERED),
        ("garbage", first_tool, UNPARSED),
        ("call", no_tool, MAX_TURNS),
    ):
        trajs = play(replaying(spoil(kind)))
        assert [i for i, (t, g) in enumerate(zip(TASKS, trajs)) if not solved(t, g)] == [task], kind
        assert trajs[task].ended == ended, kind
        m = task_metrics(TASKS, trajs)
        if kind == "call":  # a call where none is needed: irrelevance, not task success
            assert m["task_success"] == 1.0 and m["irrelevance"] == pytest.approx(1 - 1 / n_none)
        else:
            assert m["task_success"] == pytest.approx(1 - 1 / n_tool) and m["irrelevance"] == 1.0


def test_a_prompt_too_long_ends_the_task():
    trajs = play(replaying(), max_length=64)  # room for a request, not for a tool's result after it
    for task, traj in zip(TASKS, trajs):
        if task.calls:
            assert traj.ended == TOO_LONG and not solved(task, traj)
    assert {t.ended for t in trajs} <= {TOO_LONG, ANSWERED} and TOO_LONG in {t.ended for t in trajs}


def test_pass_hat_k_counts_tasks_solved_in_every_sample():
    spoilt = [i for i, t in enumerate(TASKS) if t.calls][:3]
    good = play(replaying())
    bad = play(replaying(lambda text, task, turn: "?<|im_end|>" if task in spoilt else text))
    m = task_metrics(TASKS, good, [good, bad, good])
    n_tool = sum(bool(t.calls) for t in TASKS)
    assert m["tool_tasks"] == n_tool and m["pass^3"] == pytest.approx(1 - 3 / n_tool)
    assert m["sampled_success"] == pytest.approx((3 * n_tool - 3) / (3 * n_tool))


def test_arguments_compare_as_bfcl_does():
    assert same_value(5, 5.0) and same_value({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not same_value(True, 1) and not same_value(1, True) and not same_value("5", 5)
    assert not same_value({"a": 1, "b": 2}, {"a": 1}) and not same_value([1], [1, 2])
    # strings: case, spaces and the punctuation BFCL strips do not count; other characters do
    assert same_value("new-york, N.Y.", "New York NY") and same_value("a_b*c^d/e", "ABCDE")
    assert not same_value("Oslo", "Bergen") and not same_value("a:b", "ab")


def forecast(city: str, unit: Literal["c", "f"] = "c", days: int = 1, ratio: float = 1.0) -> dict:
    """A forecast.

    Args:
        city: where
        unit: degrees
        days: how many days
        ratio: a scale
    """
    return {}


BOX = Toolbox.from_functions([forecast])
SCHEMA = BOX.schemas[0]


@pytest.mark.parametrize(
    "got, want, ok",
    [
        ({"city": "Oslo", "unit": "c"}, {"city": "Oslo"}, True),  # an optional argument given at its default
        ({"city": "Oslo"}, {"city": "Oslo", "days": 1}, True),  # ... or left out where the reference gives it
        ({"city": "Oslo", "unit": "f"}, {"city": "Oslo"}, False),  # not at its default
        ({"city": "Oslo"}, {"city": "Oslo", "days": 2}, False),
        ({"city": "oslo "}, {"city": "Oslo"}, True),  # strings as BFCL compares them
        ({"city": "Oslo", "ratio": 2}, {"city": "Oslo", "ratio": 2.0}, True),  # an integer where a number is asked
        ({"city": "Oslo", "days": 2.0}, {"city": "Oslo", "days": 2}, False),  # never a number for an integer
        ({"city": "Oslo", "days": "2"}, {"city": "Oslo", "days": 2}, False),  # nor a string for a number
        ({"city": "Oslo", "unit": "k"}, {"city": "Oslo", "unit": "k"}, False),  # outside the enum
        ({"city": "Oslo", "when": 1}, {"city": "Oslo", "when": 1}, False),  # an argument the tool does not take
        ({"unit": "c"}, {"unit": "c"}, False),  # the required one missing
    ],
)
def test_calls_are_judged_against_the_schema_as_bfcl_does(got, want, ok):
    assert BOX.defaults == {"forecast": {"unit": "c", "days": 1, "ratio": 1.0}}
    assert call_matches(("forecast", got), ("forecast", want), SCHEMA, BOX.defaults["forecast"]) is ok
    assert not call_matches(("weather", got), ("forecast", want), SCHEMA, BOX.defaults["forecast"])


def test_without_a_schema_calls_compare_by_value_and_defaults_come_from_either():
    assert call_matches(("f", {"a": 5}), ("f", {"a": 5.0})) and not call_matches(
        ("f", {"a": 5, "b": 1}), ("f", {"a": 5})
    )
    assert call_matches(("f", {"a": 5, "b": 1}), ("f", {"a": 5}), defaults={"b": 1})
    with_default = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "default": 1}},
                "required": ["a"],
            },
        },
    }
    assert call_matches(("f", {"a": 5, "b": 1}), ("f", {"a": 5}), with_default)
    assert not call_matches(("f", {"a": 5, "b": 2}), ("f", {"a": 5}), with_default)


def test_task_success_judges_each_call_with_its_tools_schema_and_defaults():
    task = Task(
        [{"role": "user", "content": "Oslo?"}], BOX.schemas, [("forecast", {"city": "Oslo"})], "It is -3 in Oslo."
    )

    def traj(args):
        return Trajectory(
            calls=[("forecast", args)], statuses=["ok"], results=['{"t": -3}'], final="-3 it is", ended=ANSWERED
        )

    assert solved(task, traj({"city": "Oslo", "days": 1}), BOX.defaults)
    assert not solved(task, traj({"city": "Oslo", "days": 1}))  # no defaults known: the extra argument counts
    assert not solved(task, traj({"city": "Oslo", "days": 1.0}), BOX.defaults)
    m = task_metrics([task], [traj({"city": "OSLO", "unit": "c"})], defaults=BOX.defaults)
    assert m["task_success"] == 1.0


def test_trajectory_rows_learn_the_models_turns_only():
    from jkd.agents.tasks import trajectory_rows

    trajs = play(replaying())
    ids, learn = trajectory_rows(TOK, TASKS, trajs, max_length=4096)
    for conv, row, mask in zip(CONVS, ids, learn):
        full = TOK.decode(row)
        assert full == render_chat(TOK, conv["messages"])  # the reference conversation, replayed
        learned = TOK.decode(row[mask])
        replies = [m for m in conv["messages"] if m["role"] == "assistant"]
        assert learned.count("<|im_end|>") == len(replies)  # each of the model's turns, its end included
        for m in conv["messages"]:
            if m["role"] == "tool":
                assert m["content"] not in learned  # the tools' results are read, never learned
            if m["role"] == "assistant" and m.get("content"):
                assert m["content"] in learned
        assert not mask[: len(TOK.encode(render_chat(TOK, conv["messages"][:1], add_generation_prompt=True)))].any()
    short, short_learn = trajectory_rows(TOK, TASKS, trajs, max_length=50)
    assert all(len(r) <= 50 and len(m) == len(r) for r, m in zip(short, short_learn))
