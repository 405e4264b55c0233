"""The LM report's verdicts on hand-made entries."""

from jkd.lm_report import table, verdicts


def entry(name, role, exact, ce, *, signal, std=0.01, student="s"):
    return {"name": name, "role": role, "loss": "x", "params": 10, "size_bytes": 2048, "seeds": 3,
            "student": student, "teacher_signal": signal, "tool_call_exact_match_mean": exact,
            "tool_call_exact_match_std": std, "test_cross_entropy_mean": ce, "test_cross_entropy_std": std}


def test_verdicts_compare_with_the_student_alone_and_with_the_same_start():
    entries = [
        {**entry("teacher", "teacher", 0.9, 0.1, signal=False), "student": None},
        entry("s alone", "student_alone", 0.10, 1.00, signal=False),
        entry("s layers + labels", "distilled", 0.50, 0.20, signal=False),
        entry("s seq", "distilled", 0.55, 0.30, signal=True),      # better exact match, worse CE
        entry("s jsd", "distilled", 0.495, 0.205, signal=True),   # within the spread on both
    ]
    notes = verdicts(entries)
    assert notes[0].startswith("s seq beats s alone on tool-call exact match")
    assert notes[1].startswith("s seq beats s alone on test cross-entropy")
    seq = next(n for n in notes if n.startswith("s seq against"))
    assert "exact match 0.5500 vs 0.5000 (better" in seq and "0.3000 vs 0.2000 (worse" in seq
    assert "adds nothing" not in seq
    jsd = next(n for n in notes if n.startswith("s jsd against"))
    assert jsd.count("within the spread") == 2 and jsd.endswith("adds nothing measurable here.")
    # a distilled setting within the alone's spread is not called a win
    close = [entry("s alone", "student_alone", 0.50, 0.5, signal=False, std=0.05),
             entry("s kd", "distilled", 0.52, 0.49, signal=True, std=0.05)]
    assert all("does not beat" in n for n in verdicts(close))
    assert "| s kd | distilled | x | 10 | 2 | 52.0 +- 5.0 |" in table(close)
