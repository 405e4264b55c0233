"""The comparison of a run: ``summary.json`` (for tools) and ``report.md`` (for people)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jkd.runtime.atomic import atomic_write

ROLES = ("teacher", "student_alone", "distilled")


def table(entries: list[dict]) -> str:
    """A markdown table: accuracy mean +- std over seeds, the teacher-student gap closed, epochs
    and training cost per epoch against the student alone, parameters, FLOPs, size, latency."""
    head = (
        "| model | role | loss | test accuracy (%) | gap closed (%) | seeds | epochs | time / epoch (x alone) | "
        "params | MFLOPs/example | size on disk (KB) | latency / batch (ms) |"
    )
    rows = [head, "|" + "---|" * 12]
    for e in entries:
        acc = f"{100 * e['test_accuracy_mean']:.2f}"
        if len(e["test_accuracy_per_seed"]) > 1:
            acc += f" +- {100 * e['test_accuracy_std']:.2f}"
        gap = f"{100 * e['gap_closed']:.0f}" if "gap_closed" in e else ""
        cost = f"{e['epoch_cost_vs_alone']:.2f}" if "epoch_cost_vs_alone" in e else ""
        rows.append(
            f"| {e['name']} | {e['role']} | {e['loss']} | {acc} | {gap} | {len(e['test_accuracy_per_seed'])} | "
            f"{e.get('epochs') or ''} | {cost} | {e['params']:,} | {e['flops'] / 1e6:.2f} | "
            f"{e['size_bytes'] / 1024:.0f} | "
            f"{e['latency_ms']:.2f} |"
        )
    return "\n".join(rows)


@dataclasses.dataclass
class Report:
    """What a run's report says: its ``title``, its ``table`` (markdown, from the entries), its
    ``notes`` (the verdicts and how it was measured), its ``figures`` (``(caption, file)`` in the
    run folder), a ``footer`` (lines after them) and ``extra`` keys for ``summary.json``."""

    title: str
    table: str
    notes: list[str]
    figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    footer: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)


def markdown(report: Report) -> str:
    """``report.md``'s text."""
    body = [f"# {report.title}", "", report.table, ""] + [f"- {n}" for n in report.notes]
    if report.figures:
        body += [""] + [f"![{caption}]({file})" for caption, file in report.figures]
    return "\n".join(body + list(report.footer)) + "\n"


def write(
    run_dir: Path,
    entries: list[dict],
    report: Report,
    *,
    roles: tuple[str, ...] | None = ROLES,
    names: tuple[str, str] = ("summary.json", "report.md"),
) -> str:
    """Write ``summary.json`` (the entries, the notes, the report's text for ``jkd report``) and
    ``report.md``, each whole or not at all; return the table. Every entry's role must be one of
    ``roles`` (None: any)."""
    for e in entries:
        if roles is not None and e.get("role") not in roles:
            raise ValueError(f"role must be one of {roles}; got {e.get('role')!r} for {e.get('name')}.")
    summary = {
        "title": report.title,
        "models": entries,
        "notes": report.notes,
        **report.extra,
        "report": {"table": report.table, "figures": [list(f) for f in report.figures], "footer": list(report.footer)},
    }
    atomic_write(Path(run_dir) / names[0], json.dumps(summary, indent=2))
    atomic_write(Path(run_dir) / names[1], markdown(report))
    return report.table


def rewrite(run_dir: Path, summary_name: str = "summary.json", report_name: str = "report.md") -> str:
    """``report.md`` again from ``summary.json`` (``jkd report``); returns its text."""
    path = Path(run_dir) / summary_name
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a finished run folder?")
    data = json.loads(path.read_text())
    if "report" not in data:
        raise ValueError(
            f"{path} was written by an earlier jkd without the report's text; run the job again "
            "with --resume to write it."
        )
    r = data["report"]
    text = markdown(
        Report(data.get("title", ""), r["table"], data["notes"], [tuple(f) for f in r["figures"]], r["footer"])
    )
    atomic_write(Path(run_dir) / report_name, text)
    return text


def compression_table(rows: list[dict]) -> str:
    """A markdown table of a compression run: accuracy and its change against the float
    student, sparsity, parameters and FLOPs, size on disk, and latency at batch 1 and 128 in the
    runtime each row is deployed with."""
    head = (
        "| model | kind | test accuracy (%) | vs student (points) | sparsity | params | MFLOPs / image | "
        "size (KB) | runtime | latency batch 1 (ms) | latency batch 128 (ms) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        sparsity = f"{r['sparsity']:.2f}" if "sparsity" in r else ""
        params = f"{r['params']:,}" if "params" in r else ""
        flops = f"{r['flops'] / 1e6:.2f}" if "flops" in r else ""
        b1 = f"{r['latency_ms_batch1']:.3f}" if "latency_ms_batch1" in r else ""
        b128 = f"{r['latency_ms_batch128']:.2f}" if "latency_ms_batch128" in r else f"{r['latency_ms']:.2f}"
        lines.append(
            f"| {r['name']} | {r['kind']} | {100 * r['test_accuracy']:.2f} | "
            f"{100 * r['delta_vs_student']:+.2f} | {sparsity} | {params} | {flops} | "
            f"{r['size_bytes'] / 1024:.0f} | {r.get('runtime', 'jax')} | {b1} | {b128} |"
        )
    return "\n".join(lines)
