"""The LM report's verdicts on hand-made entries."""

from jkd.jobs.lm_report import table, verdicts


def entry(name, role, exact, ce, *, signal, std=0.01, student="s"):
    return {
        "name": name,
        "role": role,
        "loss": "x",
        "params": 10,
        "size_bytes": 2048,
        "seeds": 3,
        "student": student,
        "teacher_signal": signal,
        "tool_call_exact_match_mean": exact,
        "tool_call_exact_match_std": std,
        "test_cross_entropy_mean": ce,
        "test_cross_entropy_std": std,
    }


def test_verdicts_compare_with_the_student_alone_and_with_the_same_start():
    entries = [
        {**entry("teacher", "teacher", 0.9, 0.1, signal=False), "student": None},
        entry("s alone", "student_alone", 0.10, 1.00, signal=False),
        entry("s layers + labels", "distilled", 0.50, 0.20, signal=False),
        entry("s seq", "distilled", 0.55, 0.30, signal=True),  # better exact match, worse CE
        entry("s jsd", "distilled", 0.495, 0.205, signal=True),  # within the spread on both
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
    close = [
        entry("s alone", "student_alone", 0.50, 0.5, signal=False, std=0.05),
        entry("s kd", "distilled", 0.52, 0.49, signal=True, std=0.05),
    ]
    assert all("does not beat" in n for n in verdicts(close))
    assert "| s kd | distilled | x | 10 | 2 | 52.0 +- 5.0 |" in table(close)


def test_gap_closed_and_the_all_labels_control():
    def with_tasks(e, success):
        return {**e, "task_success_mean": success, "task_success_std": 0.02}

    entries = [
        with_tasks({**entry("teacher", "teacher", 0.8, 0.1, signal=False), "student": None}, 0.8),
        with_tasks(entry("s alone", "student_alone", 0.0, 1.0, signal=False), 0.0),
        with_tasks(entry("s labels", "distilled", 0.40, 0.2, signal=False), 0.40),
        with_tasks({**entry("s all labels", "distilled", 0.66, 0.05, signal=False), "all_labels": True}, 0.66),
        with_tasks(entry("s seq", "distilled", 0.67, 0.06, signal=True), 0.70),
        with_tasks(entry("s fkl", "distilled", 0.45, 0.1, signal=True), 0.45),
    ]
    notes = verdicts(entries)
    # the best setting is picked among those with the teacher's signal, by task success
    assert notes[0].startswith("s seq beats s alone on task success by more than the seed spread: 0.7000 vs 0.0000")
    # (0.70 - 0.40) / (0.80 - 0.40) = 75%
    assert (
        "s seq closes 75% of the gap on task success between s labels (40.0%) and the teacher (80.0%), at 70.0%."
        in notes
    )
    assert (
        "s seq closes 68% of the gap on exact match between s labels (40.0%) and the teacher (80.0%), at 67.0%."
        in notes
    )
    fkl_all = next(n for n in notes if n.startswith("s fkl against s all labels"))
    assert fkl_all.endswith("It does no better than the same start on all the labelled conversations.")


def test_the_data_line_is_a_sentence_and_the_counts_stay_numbers():
    from jkd.jobs.lm_report import data_line

    counts = {
        "train": 300,
        "labelled_subset": 40,
        "test": 12,
        "unlabelled": 8,
        "train_truncated": 3,
        "train_dropped": 1,
        "test_truncated": 0,
        "test_turns": 20,
        "test_turns_skipped": 2,
        "unlabelled_skipped": 0,
        "truncation_rule": "the last turns",
    }
    line = data_line(counts)
    assert "{" not in line and "'" not in line  # not a Python dict printed
    assert line.startswith(
        "Data: 300 labelled conversations for the teacher, 40 for the students, 8 unlabelled "
        "requests, 12 test conversations (20 assistant turns measured)."
    )
    assert (
        "Beyond max_length: 3 training conversations shortened, 1 dropped (no assistant token left), "
        "2 test turns skipped (prompt too long) (rule: the last turns)."
    ) in line


def test_curves_draw_each_kind_of_loss_on_its_own_axis(tmp_path, monkeypatch):
    from jkd.jobs import lm_report
    from jkd.evaluate import plots

    drawn, real = {}, plots.loss_panels
    monkeypatch.setattr(plots, "loss_panels", lambda panels, path, **kw: drawn.update(panels))
    monkeypatch.setattr(plots, "accuracy_vs_size", lambda *a, **k: None)
    entries = [
        {**entry("teacher", "teacher", 0.9, 0.1, signal=False), "loss": "cross-entropy (all labelled)"},
        {**entry("s alone", "student_alone", 0.1, 1.0, signal=False), "loss": "cross-entropy"},
        {**entry("s fkl", "distilled", 0.5, 0.5, signal=True), "loss": "ForwardKL"},
        {**entry("s jsd", "distilled", 0.5, 0.5, signal=True), "loss": "GeneralizedJSD"},
    ]
    rec = lambda loss: [{"event": "train", "step": 1, "loss": loss}, {"event": "train", "step": 2, "loss": loss / 2}]  # noqa: E731
    histories = {"teacher": rec(2.0), "s alone": rec(3.0), "s fkl": rec(0.4), "s jsd": rec(0.1)}
    lm_report.build_report(
        tmp_path,
        entries,
        {},
        [],
        histories=histories,
        title="t",
        counts={"train": 1, "labelled_subset": 1, "unlabelled": 0, "test": 1},
        seconds=1.0,
    )
    assert sorted(drawn) == [
        "train loss: ForwardKL",
        "train loss: GeneralizedJSD",
        "train loss: cross-entropy",
        "train loss: cross-entropy (all labelled)",
    ]
    assert list(drawn["train loss: ForwardKL"]) == ["s fkl"]  # a KL never shares an axis with a cross-entropy
    real(drawn, tmp_path / "c.png")  # the real figure draws
    assert (tmp_path / "c.png").stat().st_size > 0


def test_evaluation_of_nothing_and_empty_answers():
    """No turn to measure gives empty metrics, not a crash; two empty answers do not agree."""
    import numpy as np
    from flax import nnx

    from jkd.data.conversations import Turn
    from jkd.data.tokenizer import byte_tokenizer
    from jkd.jobs.lm_evaluation import agreement, evaluate_model, generate_texts
    from jkd.models.decoder import Decoder
    from jkd.models.decoder_config import DecoderConfig

    tok = byte_tokenizer()
    cfg = DecoderConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=128,
        eos_token_id=tok.eos_id,
    )
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    assert generate_texts(model, [], tok, max_new_tokens=4) == ([], None)  # was UnboundLocalError
    metrics, texts = evaluate_model(model, [], tok, max_new_tokens=4, reference_texts=[])
    assert texts == [] and metrics["generation_tokens_per_s"] is None and metrics["agreement_with_teacher"] is None
    turn = Turn(0, np.array([1, 2, 3], np.int32), {"role": "assistant", "content": "x"}, [])
    _, (text,) = evaluate_model(model, [turn], tok, max_new_tokens=2)
    m, _ = evaluate_model(model, [turn], tok, max_new_tokens=2, reference_texts=[text + " and more"])
    assert m["agreement_with_teacher"] == 0.0
    assert agreement(["", " ", "call", "x"], ["", "", "call ", "y"]) == 0.25  # the empty pairs count as different


def test_fields_added_to_the_lm_config_keep_earlier_run_folders_resumable():
    """A run folder written before a config field existed is the same run under the field's
    default: added fields default to None (the guard's rule), or are evaluation settings that may
    change on resume."""
    import dataclasses
    import json

    from jkd.jobs import lm as LX
    from jkd.runtime.run_folder import config_changes, guarded_config

    cfg = LX.demo_config()
    cfg = dataclasses.replace(
        cfg, distillations=tuple(LX.LMDistillation(d.name, d.objective, d.teacher_answers) for d in cfg.distillations)
    )
    new = json.loads(json.dumps(guarded_config(cfg)))
    old = json.loads(json.dumps(new))
    for f in ("tools_file", "tool_timeout_s", "tool_format", "max_turns", "pass_k", "pass_temperature"):
        old.pop(f)
    for d in old["distillations"]:
        d.pop("through_tools")
    changes = config_changes(old, new)
    assert {c[0] for c in changes} == {"max_turns", "pass_k", "pass_temperature"}
    assert all(c[0] in LX.evaluation_keys(cfg) for c in changes)


def test_a_different_start_without_its_control_is_said():
    """A student cut from the teacher against the student alone (a random start): the report says
    the difference mixes the start and the teacher's signal, and how to run the control; with the
    control in the report, or one start for both, it says nothing of the kind."""
    alone = {**entry("s alone", "student_alone", 0.0, 0.8, signal=False), "initialisation": "random"}
    seq = {**entry("s seq", "distilled", 0.5, 0.09, signal=True), "initialisation": "teacher layers"}
    notes = verdicts([alone, seq])
    mixed = [n for n in notes if "starts from a random initialisation" in n]
    assert len(mixed) == 1 and "from the teacher's blocks" in mixed[0] and "--kd-weight 0" in mixed[0]
    control = {**entry("s labels only", "distilled", 0.5, 0.09, signal=False), "initialisation": "teacher layers"}
    assert not [n for n in verdicts([alone, control, seq]) if "starts from a random" in n]
    folder = {**alone, "initialisation": "student folder"}
    assert not [n for n in verdicts([folder, {**seq, "initialisation": "student folder"}]) if "starts from" in n]
