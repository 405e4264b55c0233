"""How well a model acts as an agent: its generated assistant turns against reference turns.

A generated turn is read by the model family's tool-call format (:mod:`jkd.agents.formats`;
decode it with special tokens kept). Metrics over a set of turns (:func:`tool_metrics`):

- ``tool_call_exact_match``: turns whose reference calls a tool, where the generated calls equal
  the reference calls (names and arguments, order kept; values compared as BFCL does,
  :func:`jkd.agents.tasks.same_value`);
- ``tool_name_accuracy``: the same turns, where the called tool names equal the reference's;
- ``argument_accuracy``: the reference arguments (name, value) reproduced in the call to the same
  tool, over all reference arguments;
- ``tool_call_parse_rate``: generated calls the format reads as ``(name, arguments object)``,
  over the calls the format saw begin (``None`` when no call was attempted);
- ``tool_call_precision`` / ``tool_call_recall``: calls to a tool the reference calls in that turn,
  over generated calls / over reference calls (a call on a request that needs no tool counts
  against precision, a missing call against recall);
- ``final_answer_correct``: turns that answer a tool's result (the message before is a ``tool``
  message, the reference calls nothing), judged by :data:`FINAL_ANSWER_RULE`;
- ``no_tool_accuracy``: turns whose reference calls nothing, where the generated turn calls nothing.

``tool_call_attempts`` counts the calls the format saw begin, and ``turns_read_as_<format>`` the
turns that another named format reads as calls (when this one saw none); :func:`format_warning`
turns a set of metrics whose calls could not be read into a sentence for the report.
"""

from __future__ import annotations

from typing import Sequence

from jkd.agents.formats import FORMATS, HERMES, ParsedTurn, ToolFormat, message_calls
from jkd.agents.tasks import call_matches, same_value
from jkd.agents.tools import result_values

FINAL_ANSWER_RULE = (
    "a final answer is correct when it calls no tool, is not empty, and states every value of the "
    "tool's result that the reference answer states"
)


def _result_values(context: Sequence[dict]) -> list[str] | None:
    """The numbers and strings of the tool result just before the turn (None: not after a tool;
    a result that is not JSON states nothing to check)."""
    if not context or context[-1].get("role") not in ("tool", "ipython", "function"):
        return None
    content = context[-1].get("content") or ""
    values = result_values(content)
    return [] if values == [content] else values


def final_answer_ok(text: ParsedTurn, reference: dict, context: Sequence[dict]) -> bool:
    """:data:`FINAL_ANSWER_RULE` for a generated turn after the tool result ending ``context``."""
    stated = [v for v in _result_values(context) or [] if v in (reference.get("content") or "")]
    return not text.calls and not text.attempts and bool(text.content) and all(v in text.content for v in stated)


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def tool_metrics(
    turns: Sequence[tuple[dict, list[dict], str]], fmt: ToolFormat = HERMES, special_tokens: Sequence[str] = ()
) -> dict[str, float | None]:
    """Metrics of the module docstring over ``(reference message, context messages, generated text)``
    triples, the texts read by ``fmt`` (:meth:`ToolFormat.read`); a metric whose denominator is empty is
    ``None``."""
    n_call_turns = exact = names = 0
    arg_total = arg_ok = 0
    attempts = valid = 0
    pred_calls = correct_pred = ref_total = correct_ref = 0
    final_turns = final_ok = 0
    no_tool_turns = no_tool_ok = 0
    others = {name: 0 for name in FORMATS if name != fmt.name}
    for ref_msg, context, text in turns:
        ref = message_calls(ref_msg)
        got = fmt.read(text, special_tokens)
        if not got.attempts:
            for name in others:
                others[name] += bool(FORMATS[name].read(text, special_tokens).calls)
        pred = got.calls
        attempts += got.attempts
        valid += len(pred)
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
            exact += len(pred) == len(ref) and all(call_matches(p, r) for p, r in zip(pred, ref))
            names += [n for n, _ in pred] == ref_names
            for name, args in ref:
                match = next((a for n, a in pred if n == name), {})
                for k, v in args.items():
                    arg_total += 1
                    arg_ok += isinstance(match, dict) and k in match and same_value(match[k], v)
        else:
            no_tool_turns += 1
            no_tool_ok += got.attempts == 0
            if _result_values(context) is not None:
                final_turns += 1
                final_ok += final_answer_ok(got, ref_msg, context)
    return {
        "tool_call_exact_match": _ratio(exact, n_call_turns),
        "tool_name_accuracy": _ratio(names, n_call_turns),
        "argument_accuracy": _ratio(arg_ok, arg_total),
        "tool_call_parse_rate": _ratio(valid, attempts),
        "tool_call_precision": _ratio(correct_pred, pred_calls),
        "tool_call_recall": _ratio(correct_ref, ref_total),
        "final_answer_correct": _ratio(final_ok, final_turns),
        "no_tool_accuracy": _ratio(no_tool_ok, no_tool_turns),
        "turns": len(turns),
        "tool_call_turns": n_call_turns,
        "final_answer_turns": final_turns,
        "tool_call_attempts": attempts,
        **({f"turns_read_as_{name}": n for name, n in others.items() if n} if not attempts else {}),
    }


def format_warning(metrics: dict, fmt: ToolFormat, model: str) -> str | None:
    """A sentence when ``model``'s calls could not be read in ``fmt``: it began calls and none
    parsed, or it began none while its turns read as calls in another format."""
    attempts, calls = metrics.get("tool_call_attempts") or 0, metrics.get("tool_call_turns") or 0
    if attempts and not metrics.get("tool_call_parse_rate"):
        return (
            f"{model}: none of the tool calls it began could be parsed in the {fmt.name} format, so every call "
            "metric is 0: it has not learned to write them, or writes them another way (then name that format "
            "with --tool-format)"
        )
    elsewhere = {k[len("turns_read_as_") :]: v for k, v in metrics.items() if k.startswith("turns_read_as_") and v}
    if calls and not attempts and elsewhere:
        name, n = max(elsewhere.items(), key=lambda kv: kv[1])
        return (
            f"{model}: it began no tool call in the {fmt.name} format on {calls} turns that needed one, but "
            f"{n:g} of its turns read as calls in the {name} format; name that format with --tool-format {name}"
        )
    return None
