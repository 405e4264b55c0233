"""The report of a language-model run: ``summary.json``, ``report.md``, figures, ``samples.md``.

Roles are the image side's (``teacher``, ``student_alone``, ``distilled``); every metric is given as
mean +- std over seeds. The verdict lines compare the best distilled student with the student
alone by more than the seed spread, on tool-call exact match and on test cross-entropy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from jkd.agents.formats import HERMES, ToolFormat
from jkd.data.conversations import Turn
from jkd.evaluate import plots, report
from jkd.evaluate.toolcalls import FINAL_ANSWER_RULE, format_warning
from jkd.runtime.atomic import atomic_write
from jkd.jobs.seeds import margin_and_spread, verdict

COLUMNS = (
    ("tool_call_exact_match", "exact match", 100),
    ("tool_name_accuracy", "tool name", 100),
    ("argument_accuracy", "arguments", 100),
    ("tool_call_parse_rate", "calls parsed", 100),
    ("tool_call_precision", "precision", 100),
    ("tool_call_recall", "recall", 100),
    ("final_answer_correct", "final answer", 100),
    ("no_tool_accuracy", "no-tool", 100),
    ("test_cross_entropy", "test CE (nats)", 1),
    ("agreement_with_teacher", "agrees w/ teacher", 100),
)


def _cell(e: dict, key: str, scale: float) -> str:
    if f"{key}_mean" not in e:
        return "-"
    mean, std = scale * e[f"{key}_mean"], scale * e[f"{key}_std"]
    digits = 1 if scale == 100 else 3
    return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if e["seeds"] > 1 else "")


def _columns(entries: Sequence[dict]) -> list[tuple[str, str, float]]:
    """:data:`COLUMNS`, after task success and pass^k where they were measured."""
    tasks = (
        [("task_success", "task success", 100), ("irrelevance", "irrelevance", 100)]
        if any("task_success_mean" in e for e in entries)
        else []
    )
    passes = sorted({k[: -len("_mean")] for e in entries for k in e if k.startswith("pass^") and k.endswith("_mean")})
    return tasks + [(k, k, 100) for k in passes] + list(COLUMNS)


def table(entries: Sequence[dict]) -> str:
    columns = _columns(entries)
    head = ["model", "role", "loss", "params", "weights (KB)"] + [c[1] for c in columns] + ["perplexity", "gen tok/s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        ppl = f"{math.exp(e['test_cross_entropy_mean']):.3f}" if "test_cross_entropy_mean" in e else "-"
        speed = e.get("generation_tokens_per_s_mean")
        rows.append(
            "| "
            + " | ".join(
                [e["name"], e["role"], e["loss"], f"{e['params']:,}", f"{e['size_bytes'] / 1024:.0f}"]
                + [_cell(e, k, s) for k, _, s in columns]
                + [ppl, "-" if speed is None else f"{speed:.0f}"]
            )
            + " |"
        )
    return "\n".join(rows)


def _compare(best: dict, other: dict, key: str, better: int, label: str) -> str | None:
    sentence = verdict(best, other, key, label=label, better=better)
    return None if sentence is None else sentence + "."


METRICS = (
    ("task_success", 1, "task success"),
    ("tool_call_exact_match", 1, "tool-call exact match"),
    ("test_cross_entropy", -1, "test cross-entropy"),
)  # a metric a run did not measure is left out


def _headline(e: dict) -> float:
    """What picks a student's best setting: task success where measured, else exact match."""
    return e.get("task_success_mean", e.get("tool_call_exact_match_mean", -1))


# a student's start in words (the job's "initialisation" of a trained group)
STARTS = {
    "teacher layers": "the teacher's blocks",
    "teacher layers, pruned": "the teacher's blocks, narrowed",
    "student folder": "the student folder's weights",
}


def verdicts(entries: Sequence[dict]) -> list[str]:
    """For each student size: does its best setting with the teacher's signal beat it alone by more
    than the seed spread, on task success and exact match (higher is better) and on test
    cross-entropy (lower is better)? Where students start from the teacher's layers, does each
    setting with the teacher's signal (KD losses, its answers, on-policy scoring) beat the same
    start on the labels alone, and how much of the gap between that control and the teacher does
    the best one close?"""
    notes = []
    teacher = next((e for e in entries if e["role"] == "teacher"), None)
    by_student: dict = {}
    for e in entries:
        if e["role"] != "teacher":
            by_student.setdefault(e.get("student"), []).append(e)
    for group in by_student.values():
        alone = next((e for e in group if e["role"] == "student_alone"), None)
        quantized = [e for e in group if e.get("quantization")]
        distilled = [e for e in group if e["role"] == "distilled" and not e.get("quantization")]
        labels_only = [e for e in distilled if not e.get("teacher_signal", True)]
        with_signal = [e for e in distilled if e.get("teacher_signal", True)]
        best = max(with_signal or distilled, key=_headline) if distilled else None
        if alone is not None and best is not None:
            notes += [n for key, better, label in METRICS if (n := _compare(best, alone, key, better, label))]
            start = best.get("initialisation", "random")
            if start != alone.get("initialisation", "random") and not labels_only:
                notes.append(
                    f"{alone['name']} starts from a random initialisation and {best['name']} from "
                    f"{STARTS.get(start, start)}, so their difference is the start and the teacher's signal "
                    "together. The same start on the labels alone separates them: jkd lm distill --mode token "
                    "--kd-weight 0 --ce-weight 1 with the same --student."
                )
        for base in labels_only:
            for e in with_signal:
                parts, wins = [], 0
                for key, better, label in METRICS:
                    if (found := margin_and_spread(e, base, key, better=better)) is None:
                        continue
                    margin, spread = found
                    wins += margin > spread
                    parts.append(
                        f"{label} {e[f'{key}_mean']:.4f} vs {base[f'{key}_mean']:.4f} "
                        f"({'better' if margin > spread else 'worse' if -margin > spread else 'within the spread'}, "
                        f"margin {margin:+.4f}, std {spread:.4f})"
                    )
                tail = (
                    ""
                    if wins
                    else " It does no better than the same start on all the labelled conversations."
                    if base.get("all_labels")
                    else " From the same start, the teacher's signal adds nothing measurable here."
                )
                notes.append(f"{e['name']} against {base['name']}: " + "; ".join(parts) + "." + tail)
        floats = {e["name"]: e for e in group if not e.get("quantization")}
        for q in quantized:  # what quantizing costs: after training, against the same weights in float32;
            # trained for it, against the best float setting with the teacher's signal
            base = (
                floats.get(q["name"].rsplit(" · ", 1)[0])
                if "after training" in q["quantization"]
                else max(with_signal or distilled, key=_headline)
                if distilled
                else None
            )
            if base is None:
                continue
            parts = [
                f"{label} {q[f'{key}_mean']:.4f} vs {base[f'{key}_mean']:.4f}"
                for key, _, label in METRICS
                if f"{key}_mean" in q and f"{key}_mean" in base
            ]
            notes.append(
                f"{q['name']} ({q['quantization']}) against {base['name']} in float32: " + "; ".join(parts) + "."
            )
        control = next((e for e in labels_only if not e.get("all_labels")), None)
        if control is not None and teacher is not None and with_signal:
            notes += [
                n
                for key, label in (("task_success", "task success"), ("tool_call_exact_match", "exact match"))
                if (
                    n := _gap_closed(
                        max(with_signal, key=lambda e: e.get(f"{key}_mean", -1)), control, teacher, key, label
                    )
                )
            ]
    crossed = [e for e in entries if e.get("cross_tokenizer")]
    notes += [f"{e['name']}: {e['cross_tokenizer']}." for e in crossed]
    if crossed:
        notes.append(
            "Across tokenizers, test cross-entropy is in nats per token of each model's own tokenizer: "
            "compare it between models of one tokenizer only; task success and exact match compare all."
        )
    return notes


def _gap_closed(best: dict, control: dict, teacher: dict, key: str, label: str) -> str | None:
    """The share of the control-to-teacher gap on ``key`` that ``best`` closes, in a sentence."""
    if not all(f"{key}_mean" in e for e in (best, control, teacher)):
        return None
    b, c, t = (e[f"{key}_mean"] for e in (best, control, teacher))
    if t <= c:
        return (
            f"{control['name']} is not below the teacher on {label} ({100 * c:.1f}% vs {100 * t:.1f}%): "
            "no gap to close."
        )
    return (
        f"{best['name']} closes {100 * (b - c) / (t - c):.0f}% of the gap on {label} between {control['name']} "
        f"({100 * c:.1f}%) and the teacher ({100 * t:.1f}%), at {100 * b:.1f}%."
    )


def _samples_md(samples: dict[str, list[str]], turns: Sequence[Turn], count: int = 6) -> str:
    picks = list(range(0, len(turns), max(1, len(turns) // count)))[:count]
    out = ["# Generated turns, side by side", ""]
    for i in picks:
        t = turns[i]
        last_user = next((m.get("content", "") for m in reversed(t.context) if m["role"] in ("user", "tool")), "")
        out += [f"## test turn {i}: after `{last_user}`", "", "| model | answer |", "|---|---|"]
        ref = t.reference.get("content") or json.dumps(
            [c.get("function", c) for c in t.reference.get("tool_calls", [])]
        )
        out.append(f"| reference | `{ref}` |")
        for name, texts in samples.items():
            out.append(f"| {name} | `{' '.join(texts[i].split())}` |")
        out.append("")
    return "\n".join(out)


def data_line(counts: dict) -> str:
    """The report's sentence on the data (from ``counts``, also kept as numbers in ``summary.json``)."""
    c = dict(counts)
    parts = [
        f"{c.pop('train')} labelled conversations for the teacher, {c.pop('labelled_subset')} for the students, "
        f"{c.pop('unlabelled')} unlabelled requests, {c.pop('test')} test conversations "
        f"({c.pop('test_turns', '?')} assistant turns measured)."
    ]
    cut = [
        f"{c.pop(k)} {label}"
        for k, label in (
            ("train_truncated", "training conversations shortened"),
            ("train_dropped", "dropped (no assistant token left)"),
            ("test_truncated", "test conversations shortened"),
            ("test_turns_skipped", "test turns skipped (prompt too long)"),
            ("unlabelled_skipped", "requests skipped (no room for an answer)"),
        )
        if c.get(k)
    ]
    rule = c.pop("truncation_rule", None)
    for k in ("train_truncated", "train_dropped", "test_truncated", "test_turns_skipped", "unlabelled_skipped"):
        c.pop(k, None)
    if cut:
        parts.append("Beyond max_length: " + ", ".join(cut) + (f" (rule: {rule})" if rule else "") + ".")
    parts += [f"{k.replace('_', ' ')}: {v}." for k, v in c.items()]
    return "Data: " + " ".join(parts)


def build_report(
    run_dir: Path,
    entries: list[dict],
    samples: dict[str, list[str]],
    turns: Sequence[Turn],
    *,
    histories: dict,
    title: str,
    counts: dict,
    seconds: float,
    tool_format: ToolFormat = HERMES,
    tool_format_line: str | None = None,
    tasks_line: str | None = None,
) -> report.Report:
    """The figures (training curves, one panel per kind of loss; exact match against size) and
    ``samples.md`` written in ``run_dir``; the table, the verdicts and the data line returned for
    :func:`jkd.evaluate.report.write`."""
    notes = verdicts(entries)
    notes.append(
        f"Tool calls: {tool_format_line or 'read in the ' + tool_format.name + ' format'}; {FINAL_ANSWER_RULE}."
    )
    if tasks_line:
        notes.append(tasks_line)
    for e in entries:  # one sentence per model and warning, naming the seeds it holds for
        seeds: dict[str, list[int]] = {}
        for k, m in enumerate(e.get("per_seed", [])):
            if (w := format_warning(m, tool_format, e["name"])) is not None:
                seeds.setdefault(w, []).append(k)
        notes += [f"{w} (seed{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))})." for w, ks in seeds.items()]
    notes.append(
        data_line(counts) + f" Each metric is mean +- std over seeds; greedy decoding; total time {seconds:.0f} s."
    )
    panels: dict[str, dict] = {}
    kinds = {e["name"]: e["loss"] for e in entries}
    for name, hs in histories.items():
        pts = [(h["step"], h["loss"]) for h in hs if h.get("event") == "train"]
        panels.setdefault(f"train loss: {kinds.get(name, name)}", {})[name] = pts
    plots.loss_panels(panels, run_dir / "curves.png", x="step")
    plots.accuracy_vs_size(
        entries, run_dir / "exact_match_vs_size.png", key="tool_call_exact_match", label="tool-call exact match (%)"
    )
    atomic_write(run_dir / "samples.md", _samples_md(samples, turns))
    return report.Report(
        title,
        table(entries),
        notes,
        [("curves", "curves.png"), ("exact match vs size", "exact_match_vs_size.png")],
        footer=["", "Generated turns of every model side by side: [samples.md](samples.md)."],
        extra={"counts": counts},
    )
