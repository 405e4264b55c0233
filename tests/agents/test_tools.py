"""A user's tools: schemas as transformers writes them, calls that refuse, raise or hang reported
without stopping anything, and the teacher's calls run through them in the agent loop."""

from __future__ import annotations

import json
import textwrap
import time
from typing import Literal

import numpy as np
import pytest

from jkd.agents.loop import agent_rows
from jkd.agents.tools import RAISED, REFUSED, TIMED_OUT, ToolError, Toolbox, function_schema
from jkd.data.chat import encode_chat
from jkd.data.tokenizer import byte_tokenizer

transformers = pytest.importorskip("transformers")


def convert(
    amount: float,
    source: Literal["EUR", "USD"],
    target: str = "EUR",
    rounded: bool = True,
    tags: list[str] | None = None,
    extra: dict | None = None,
) -> dict:
    """Convert money between currencies.

    Rates are fixed.

    Args:
        amount: how much money
        source: the currency it is in
        target: the currency wanted,
            three letters
        rounded: round to a whole number
        tags: labels for the conversion
        extra: anything else
    Returns:
        the amount in the target currency
    """


def count(n: int, items: list[int]) -> int:
    """Count.

    Args:
        n (int): a number
        items: numbers
    """


@pytest.mark.parametrize("fn", [convert, count])
def test_schema_is_what_transformers_writes(fn):
    want = transformers.utils.get_json_schema(fn)
    want["function"].pop("return", None)  # what it returns is not offered to the model
    assert function_schema(fn) == want


def test_functions_that_cannot_be_described_are_refused():
    def nodoc(a: int):
        pass

    def nohint(a):
        """Doc.

        Args:
            a: a
        """

    def undescribed(a: int, b: int):
        """Doc.

        Args:
            a: a
        """

    def star(*a: int):
        """Doc."""

    for fn, message in (
        (nodoc, "tool nodoc: it needs a docstring"),
        (nohint, "argument 'a' needs a type hint"),
        (undescribed, "argument 'b' needs a line in the docstring"),
        (star, r"\*a / \*\*a"),
    ):
        with pytest.raises(ToolError, match=message):
            function_schema(fn)


TOOLS_PY = '''
import time


def add(a: int, b: int) -> dict:
    """Add two whole numbers.

    Args:
        a: the first
        b: the second
    """
    return {"sum": a + b}


def boom(x: str) -> str:
    """Always fails.

    Args:
        x: anything
    """
    raise RuntimeError("the service is down")


def nap(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "awake"


def _helper():
    return 1
'''


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "tools.py"
    path.write_text(textwrap.dedent(TOOLS_PY))
    return path


def test_a_tools_module_runs_in_a_worker_that_a_timeout_stops(tools_file):
    box = Toolbox.from_file(tools_file, timeout_s=1.0)
    try:
        assert box.names == ["add", "boom", "nap"]  # public functions only
        ok = box.call("add", {"a": 2, "b": 40})
        assert ok.ok and json.loads(ok.content) == {"sum": 42}
        raised = box.call("boom", {"x": "y"})
        assert raised.status == RAISED and raised.content == "error: RuntimeError: the service is down"
        t0 = time.perf_counter()
        slow = box.call("nap", {"seconds": 60})
        assert slow.status == TIMED_OUT and time.perf_counter() - t0 < 30  # stopped, not waited for
        assert "did not answer within 1 s and was stopped" in slow.content
        assert box.call("nap", {"seconds": 0}).content == "awake"  # a fresh worker answers the next call
        for name, args, why in (
            ("mul", {}, "unknown tool 'mul'; the tools are add, boom, nap"),
            ("add", {"a": 1}, "missing argument(s) b; it takes a, b"),
            ("add", {"a": 1, "b": 2, "c": 3}, "unknown argument(s) c"),
            ("add", {"a": 1.5, "b": 2}, "argument a=1.5 is not a valid integer"),
            ("add", {"a": True, "b": 2}, "argument a=true is not a valid integer"),
        ):
            got = box.call(name, args)
            assert got.status == REFUSED and why in got.content, got.content
    finally:
        box.close()


def test_a_module_that_cannot_be_used_is_refused(tmp_path):
    with pytest.raises(ToolError, match="no such tools module"):
        Toolbox.from_file(tmp_path / "none.py")
    (tmp_path / "bad.py").write_text("raise ImportError('missing dependency')\n")
    with pytest.raises(ToolError, match="importing the tools module failed: ImportError: missing dependency"):
        Toolbox.from_file(tmp_path / "bad.py")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ToolError, match="no tools"):
        Toolbox.from_file(tmp_path / "empty.py")


def test_the_teachers_calls_run_through_the_users_tools(tools_file):
    tok = byte_tokenizer()
    box = Toolbox.from_file(tools_file, timeout_s=1.0)
    requests = [
        {"messages": [{"role": "user", "content": q}], "tools": box.schemas}
        for q in ("2 + 40?", "ping the service", "sleep a minute")
    ]
    prompts = [encode_chat(tok, r["messages"], tools=r["tools"], add_generation_prompt=True).ids for r in requests]
    calls = [("add", {"a": 2, "b": 40}), ("boom", {"x": "ping"}), ("nap", {"seconds": 60})]
    answers = [
        tok.encode("<tool_call>\n" + json.dumps({"name": n, "arguments": a}) + "\n</tool_call><|im_end|>")
        for n, a in calls
    ]
    seen = []

    def answer(prompts):
        seen.extend(tok.decode(p) for p in prompts)
        return [tok.encode("done<|im_end|>") for _ in prompts]

    try:
        ids, learn, counts = agent_rows(tok, requests, prompts, answers, tools=box, answer=answer, max_length=4096)
    finally:
        box.close()
    assert counts == {"ok": 1, "raised": 1, "timed_out": 1, "continued": 3}
    assert '{"sum": 42}' in seen[0]
    assert "error: RuntimeError: the service is down" in seen[1]
    assert "error: nap did not answer within 1 s and was stopped" in seen[2]
    for row, mask in zip(ids, learn):
        learned = tok.decode(np.asarray(row)[mask])
        assert learned.endswith("done<|im_end|>") and "error" not in learned and "sum" not in learned
