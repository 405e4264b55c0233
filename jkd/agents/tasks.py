"""Agents judged on whole tasks: each test conversation replayed in the loop, the model's own calls
run by the tools, scored by task success and pass^k.

A :class:`Task` is a conversation up to its last user message (the earlier turns are given) and
the reference that follows it: the calls made, in order, and the final answer. :func:`run_tasks`
plays every task in the loop, batch-wise (one generation call per turn for all tasks still going):
the model answers, the calls it makes (read in its tool-call format) run through the tools and
their results go back to it, up to ``max_turns`` assistant turns, until it answers without a call.

:data:`TASK_SUCCESS_RULE` is the verdict of a trajectory. :func:`task_metrics` gives ``task_success``
(greedy trajectories), ``pass^k`` (``k`` sampled trajectories per task: the share of tasks solved
in all ``k``, as tau-bench counts it), the sampled trajectories' mean success, and how the
trajectories ended.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import numpy as np

from jkd.agents.formats import Call, ToolFormat, message_calls
from jkd.agents.loop import tool_messages
from jkd.agents.tools import Toolbox, check_arguments, result_values
from jkd.data.chat import encode_chat
from jkd.data.tokenizer import Tokenizer

TASK_SUCCESS_RULE = (
    "task success counts the tasks whose reference calls tools; one is solved when the calls made over the whole "
    "conversation equal the reference's in order (as BFCL checks calls: the same tools, arguments of the tool's "
    "schema and types, numbers by value, strings ignoring case, spaces and ,./-_*^, an optional argument left out "
    "equal to its default), every one ran, and the "
    "last turn calls nothing, is not empty and states every value of the conversation's tool results that the "
    "reference's final answer states; irrelevance counts the tasks that need no tool, solved by an answer that "
    "calls none"
)

ANSWERED, UNPARSED, MAX_TURNS, TOO_LONG = "answered", "unparsed call", "max turns", "too long"


@dataclasses.dataclass(frozen=True)
class Task:
    """``messages``: the conversation the model continues (up to and with its last user message);
    ``tools``: the schemas offered; ``calls``: the reference's calls after it, in order;
    ``answer``: the reference's final answer."""

    messages: list[dict]
    tools: list[dict] | None
    calls: list[Call]
    answer: str


def tasks_from(conversations: Sequence[dict]) -> list[Task]:
    """A task per conversation that has an assistant turn after its last user message."""
    out = []
    for conv in conversations:
        msgs = conv["messages"]
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last_user is None:
            continue
        after = msgs[last_user + 1 :]
        answers = [m for m in after if m["role"] == "assistant"]
        if not answers:
            continue
        calls = [c for m in answers for c in message_calls(m)]
        out.append(Task(list(msgs[: last_user + 1]), conv.get("tools"), calls, answers[-1].get("content") or ""))
    return out


@dataclasses.dataclass
class Trajectory:
    """What the model did on a task: the messages it added (its turns and the tools' results), its
    calls in order, the tools' result statuses, and why it ended (``answered``, ``unparsed call``,
    ``max turns``, ``too long``)."""

    messages: list[dict] = dataclasses.field(default_factory=list)
    calls: list[Call] = dataclasses.field(default_factory=list)
    statuses: list[str] = dataclasses.field(default_factory=list)
    results: list[str] = dataclasses.field(default_factory=list)
    final: str = ""
    ended: str = ""


def run_tasks(
    generate: Callable[[list[np.ndarray]], list[np.ndarray]],
    tokenizer: Tokenizer,
    tasks: Sequence[Task],
    *,
    tools: Toolbox | None,
    tool_format: ToolFormat,
    max_turns: int,
    max_length: int,
) -> list[Trajectory]:
    """Every task played in the loop; ``generate(prompts) -> new token rows`` answers a batch of
    prompts (the model, greedy or sampled). A prompt that would exceed ``max_length`` tokens ends
    its task (``too long``); a turn whose call cannot be parsed ends it (``unparsed call``)."""
    trajectories = [Trajectory() for _ in tasks]
    going = list(range(len(tasks)))
    specials = tokenizer.special_token_texts
    for turn in range(max_turns):
        prompts, kept = [], []
        for i in going:
            t = tasks[i]
            ids = encode_chat(
                tokenizer, t.messages + trajectories[i].messages, tools=t.tools, add_generation_prompt=True
            ).ids
            if len(ids) >= max_length:
                trajectories[i].ended = TOO_LONG
            else:
                prompts.append(ids)
                kept.append(i)
        if not kept:
            break
        going = []
        for i, row in zip(kept, generate(prompts)):
            traj = trajectories[i]
            read = tool_format.read(tokenizer.decode(row), specials)
            if not read.calls:
                traj.messages.append({"role": "assistant", "content": read.content})
                traj.final, traj.ended = read.content, (UNPARSED if read.attempts else ANSWERED)
                continue
            results = [tools.call(n, a) for n, a in read.calls] if tools is not None else []
            if tools is None:  # no tools to run: the call is the model's last word
                traj.calls += read.calls
                traj.ended = ANSWERED
                continue
            traj.messages += [tool_format.message(read.calls, read.content), *tool_messages(read.calls, results)]
            traj.calls += read.calls
            traj.statuses += [r.status for r in results]
            traj.results += [r.content for r in results]
            going.append(i)
    for traj in trajectories:
        traj.ended = traj.ended or MAX_TURNS  # still calling tools after max_turns turns
    return trajectories


_PUNCT = re.compile(r"[ ,./\-_*^]")


def _plain(text: str) -> str:
    return _PUNCT.sub("", text).lower().replace("'", '"')


def same_value(got, want) -> bool:
    """Argument values compared as BFCL's AST checker compares them: numbers by value (``5 == 5.0``;
    a bool is never a number), strings ignoring case, spaces and the punctuation ``,./-_*^``, lists
    element by element, objects key by key."""
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(float(got), float(want), rel_tol=0, abs_tol=1e-9)
    if isinstance(want, str) and isinstance(got, str):
        return _plain(got) == _plain(want)
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(same_value(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same_value(a, b) for a, b in zip(got, want))
    return type(got) is type(want) and got == want


def call_matches(got: Call, want: Call, schema: dict | None = None, defaults: dict | None = None) -> bool:
    """``got`` is the call ``want`` (BFCL's AST check): the same tool; with its ``schema``, arguments
    the schema accepts (required ones present, none unknown, each of its type: an integer where a
    number is asked, never a number where an integer is asked, nor ``"5"`` for ``5``; enums
    respected); every argument of either call equal by :func:`same_value`, where an optional
    argument left out stands for its default (``defaults``, and the schema's ``default`` keys), so
    a call may leave it out or give it at its default whichever the reference did."""
    (name, args), (want_name, want_args) = got, want
    if name != want_name or not isinstance(args, dict) or not isinstance(want_args, dict):
        return False
    if schema is not None:
        if check_arguments(schema, args) is not None:
            return False
        props = (schema["function"].get("parameters") or {}).get("properties", {})
        defaults = {**{k: p["default"] for k, p in props.items() if "default" in p}, **(defaults or {})}
    defaults = defaults or {}
    for k in set(args) | set(want_args):
        a, b = (
            (args[k], want_args[k])
            if k in args and k in want_args
            else (args.get(k, defaults.get(k, _ABSENT)), want_args.get(k, defaults.get(k, _ABSENT)))
        )
        if a is _ABSENT or b is _ABSENT or not same_value(a, b):
            return False
    return True


_ABSENT = object()


def solved(task: Task, traj: Trajectory, defaults: dict[str, dict] | None = None) -> bool:
    """:data:`TASK_SUCCESS_RULE` (for a task that needs no tool: the irrelevance check); each call
    judged by :func:`call_matches` with the task's schema of its tool and ``defaults[tool]``."""
    if not task.calls:
        return traj.ended == ANSWERED and not traj.calls and bool(traj.final)
    if traj.ended != ANSWERED or len(traj.calls) != len(task.calls):
        return False
    schemas = {s["function"]["name"]: s for s in task.tools or [] if "function" in s}
    defaults = defaults or {}
    if not all(call_matches(c, r, schemas.get(r[0]), defaults.get(r[0])) for c, r in zip(traj.calls, task.calls)):
        return False
    if any(s != "ok" for s in traj.statuses) or not traj.final:
        return False
    stated = [v for r in traj.results for v in result_values(r) if v in task.answer]
    return all(v in traj.final for v in stated)


def task_metrics(
    tasks: Sequence[Task],
    greedy: Sequence[Trajectory],
    sampled: Sequence[Sequence[Trajectory]] = (),
    defaults: dict[str, dict] | None = None,
) -> dict[str, float | None]:
    """Over the greedy trajectories: ``task_success`` (the tasks whose reference calls tools) and
    ``irrelevance`` (the others), as :data:`TASK_SUCCESS_RULE` says; with ``sampled`` (``k``
    lists, one trajectory per task each) ``pass^k`` (the tool tasks solved in all ``k``) and
    ``sampled_success`` (their mean); ``ended_<reason>``: shares of the greedy trajectories.
    ``defaults``: ``{tool: {optional argument: default}}`` (:attr:`Toolbox.defaults`)."""
    n = len(tasks)
    tool = [i for i, t in enumerate(tasks) if t.calls]
    none = [i for i, t in enumerate(tasks) if not t.calls]

    def share(idx, trajs):
        return float(np.mean([solved(tasks[i], trajs[i], defaults) for i in idx])) if idx else None

    out: dict[str, float | None] = {
        "task_success": share(tool, greedy),
        "irrelevance": share(none, greedy),
        "tasks": n,
        "tool_tasks": len(tool),
    }
    for reason in (ANSWERED, UNPARSED, MAX_TURNS, TOO_LONG):
        out[f"ended_{reason.replace(' ', '_')}"] = (sum(g.ended == reason for g in greedy) / n) if n else None
    if sampled:
        k = len(sampled)
        each = np.asarray([[solved(tasks[i], s[i], defaults) for i in tool] for s in sampled], bool).reshape(
            k, len(tool)
        )
        out[f"pass^{k}"] = float(each.all(axis=0).mean()) if tool else None
        out["sampled_success"] = float(each.mean()) if tool else None
    return out


def trajectory_rows(
    tokenizer: Tokenizer, tasks: Sequence[Task], trajectories: Sequence[Trajectory], *, max_length: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training rows of the model's own trajectories (multi-turn on-policy distillation): each task's
    conversation with the model's turns and the tools' results, as the chat template renders it,
    learned on the model's turns only (never the given conversation, the prompts or the tools'
    results); cut at ``max_length`` tokens. The turns are the template's rendering of what the model
    said (its calls as parsed), so a call reads the same whether sampled or labelled."""
    ids, learn = [], []
    for task, traj in zip(tasks, trajectories):
        given = len(encode_chat(tokenizer, task.messages, tools=task.tools, add_generation_prompt=True).ids)
        enc = encode_chat(tokenizer, task.messages + traj.messages, tools=task.tools)
        mask = enc.assistant_mask & (np.arange(len(enc.ids)) >= given)
        ids.append(enc.ids[:max_length].astype(np.int32))
        learn.append(mask[:max_length])
    return ids, learn
