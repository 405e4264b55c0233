"""How well a model acts as an agent: its generated assistant turns against reference turns.

A generated turn is parsed as the ChatML tool-call format writes it: text, then
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks. Metrics over a set of turns
(:func:`tool_metrics`):

- ``tool_call_exact_match``: turns whose reference calls a tool, where the generated calls equal
  the reference calls (names and arguments, order kept);
- ``tool_name_accuracy``: the same turns, where the called tool names equal the reference's;
- ``argument_accuracy``: the reference arguments (name, value) reproduced in the call to the same
  tool, over all reference arguments;
- ``valid_json_rate``: generated ``<tool_call>`` blocks that parse as ``{"name": str, "arguments":
  object}``, over all generated blocks (``None`` when no block was generated);
- ``tool_call_precision`` / ``tool_call_recall``: calls to a tool the reference calls in that turn,
  over generated calls / over reference calls (a call on a request that needs no tool counts
  against precision, a missing call against recall);
- ``final_answer_correct``: turns that answer a tool's result (the message before is a ``tool``
  message, the reference calls nothing), where the generated text calls nothing and states every
  number and string of the tool's JSON result;
- ``no_tool_accuracy``: turns whose reference calls nothing, where the generated turn calls nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def reference_calls(message: dict) -> list[tuple[str, Any]]:
    """``[(name, arguments)]`` of an assistant message's ``tool_calls``."""
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        out.append((fn["name"], json.loads(args) if isinstance(args, str) else args))
    return out


def parse_turn(text: str) -> dict:
    """``{"content": str, "calls": [(name, arguments)], "blocks": int, "valid": int}``."""
    calls, blocks = [], 0
    for m in _BLOCK.finditer(text):
        blocks += 1
        try:
            obj = json.loads(m.group(1).strip())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict):
            calls.append((obj["name"], obj["arguments"]))
    content = _BLOCK.sub("", text).strip()
    return {"content": content, "calls": calls, "blocks": blocks, "valid": len(calls)}


def _result_values(context: Sequence[dict]) -> list[str] | None:
    """The numbers and strings of the tool result just before the turn (None: not after a tool)."""
    if not context or context[-1].get("role") not in ("tool", "ipython", "function"):
        return None
    try:
        result = json.loads(context[-1].get("content") or "")
    except json.JSONDecodeError:
        return []
    values = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float, str)) and not isinstance(x, bool):
            values.append(str(x))
    walk(result)
    return values


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def tool_metrics(turns: Sequence[tuple[dict, list[dict], str]]) -> dict[str, float | None]:
    """Metrics of the module docstring over ``(reference message, context messages, generated text)``
    triples; a metric whose denominator is empty is ``None``."""
    n_call_turns = exact = names = 0
    arg_total = arg_ok = 0
    blocks = valid = 0
    pred_calls = correct_pred = ref_total = correct_ref = 0
    final_turns = final_ok = 0
    no_tool_turns = no_tool_ok = 0
    for ref_msg, context, text in turns:
        ref = reference_calls(ref_msg)
        got = parse_turn(text)
        pred = got["calls"]
        blocks += got["blocks"]
        valid += got["valid"]
        ref_names = [n for n, _ in ref]
        pred_calls += len(pred)
        remaining = list(ref_names)
        for n, _ in pred:
            if n in remaining:
                remaining.remove(n)
                correct_pred += 1
        ref_total += len(ref)
        correct_ref += len(ref) - len(remaining)
        if ref:
            n_call_turns += 1
            exact += pred == ref
            names += [n for n, _ in pred] == ref_names
            for name, args in ref:
                match = next((a for n, a in pred if n == name), {})
                for k, v in args.items():
                    arg_total += 1
                    arg_ok += k in match and match[k] == v
        else:
            no_tool_turns += 1
            no_tool_ok += got["blocks"] == 0
            values = _result_values(context)
            if values is not None:
                final_turns += 1
                final_ok += got["blocks"] == 0 and bool(got["content"]) and all(v in got["content"] for v in values)
    return {
        "tool_call_exact_match": _ratio(exact, n_call_turns),
        "tool_name_accuracy": _ratio(names, n_call_turns),
        "argument_accuracy": _ratio(arg_ok, arg_total),
        "valid_json_rate": _ratio(valid, blocks),
        "tool_call_precision": _ratio(correct_pred, pred_calls),
        "tool_call_recall": _ratio(correct_ref, ref_total),
        "final_answer_correct": _ratio(final_ok, final_turns),
        "no_tool_accuracy": _ratio(no_tool_ok, no_tool_turns),
        "turns": len(turns), "tool_call_turns": n_call_turns, "final_answer_turns": final_turns,
    }
