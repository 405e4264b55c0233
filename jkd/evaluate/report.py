"""The comparison of a run: ``summary.json`` (for tools) and ``report.md`` (for people)."""

from __future__ import annotations

import json
from pathlib import Path

from jkd.runtime.atomic import atomic_write

ROLES = ("teacher", "student_alone", "distilled")


def table(entries: list[dict]) -> str:
    """A markdown table: accuracy mean +- std over seeds, the teacher-student gap closed, epochs
    and training cost per epoch against the student alone, parameters, FLOPs, size, latency."""
    head = ("| model | role | loss | test accuracy (%) | gap closed (%) | seeds | epochs | time / epoch (x alone) | "
            "params | MFLOPs/example | size on disk (KB) | latency / batch (ms) |")
    rows = [head, "|" + "---|" * 12]
    for e in entries:
        acc = f"{100 * e['test_accuracy_mean']:.2f}"
        if len(e["test_accuracy_per_seed"]) > 1:
            acc += f" +- {100 * e['test_accuracy_std']:.2f}"
        gap = f"{100 * e['gap_closed']:.0f}" if "gap_closed" in e else ""
        cost = f"{e['epoch_cost_vs_alone']:.2f}" if "epoch_cost_vs_alone" in e else ""
        rows.append(
            f"| {e['name']} | {e['role']} | {e['loss']} | {acc} | {gap} | {len(e['test_accuracy_per_seed'])} | "
            f"{e.get('epochs') or ''} | {cost} | {e['params']:,} | {e['flops'] / 1e6:.2f} | {e['size_bytes'] / 1024:.0f} | "
            f"{e['latency_ms']:.2f} |"
        )
    return "\n".join(rows)


def write(run_dir: Path, entries: list[dict], *, title: str, notes: list[str]) -> str:
    """Write ``summary.json`` and ``report.md``; return the table."""
    for e in entries:
        if e["role"] not in ROLES:
            raise ValueError(f"role must be one of {ROLES}; got {e['role']!r} for {e['name']}.")
    summary = {"title": title, "models": entries, "notes": notes}
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    md = table(entries)
    figures = ["curves.png", "accuracy_vs_size.png"] + sorted(p.name for p in run_dir.glob("confusion_*.png")) + sorted(p.name for p in run_dir.glob("roc_*.png"))
    body = [f"# {title}", "", md, ""] + [f"- {n}" for n in notes] + [""] + [f"![{f}]({f})" for f in figures]
    (run_dir / "report.md").write_text("\n".join(body) + "\n")
    return md


def compression_table(rows: list[dict]) -> str:
    """A markdown table of a compression run: accuracy and its change against the float
    student, sparsity, parameters and FLOPs, size on disk, and latency at batch 1 and 128 in the
    runtime each row is deployed with."""
    head = ("| model | kind | test accuracy (%) | vs student (points) | sparsity | params | MFLOPs / image | "
            "size (KB) | runtime | latency batch 1 (ms) | latency batch 128 (ms) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        sparsity = f"{r['sparsity']:.2f}" if "sparsity" in r else ""
        params = f"{r['params']:,}" if "params" in r else ""
        flops = f"{r['flops'] / 1e6:.2f}" if "flops" in r else ""
        b1 = f"{r['latency_ms_batch1']:.3f}" if "latency_ms_batch1" in r else ""
        b128 = f"{r['latency_ms_batch128']:.2f}" if "latency_ms_batch128" in r else f"{r['latency_ms']:.2f}"
        lines.append(f"| {r['name']} | {r['kind']} | {100 * r['test_accuracy']:.2f} | "
                     f"{100 * r['delta_vs_student']:+.2f} | {sparsity} | {params} | {flops} | "
                     f"{r['size_bytes'] / 1024:.0f} | {r.get('runtime', 'jax')} | {b1} | {b128} |")
    return "\n".join(lines)
