"""The job skeleton, driven by a toy job with no model: the order of its steps, the teacher trained
once and loaded on the rerun, nothing written before the data are checked, the report written
whole and rewritten from summary.json alike."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jkd.evaluate import report
from jkd.jobs.seeds import mean_std, verdict
from jkd.jobs.skeleton import Job, Trained, run_job
from jkd.runtime.atomic import atomic_write


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    scores: tuple[float, ...] = (1.0, 1.5)  # the student alone's scores per seed; distilled: +1
    broken: bool = False  # the data are refused
    teacher_dir: str | None = None

    def validate(self) -> None:
        if not self.scores:
            raise ValueError("scores must name one score per seed")


class ToyJob(Job):
    teacher_marker = "weights.json"

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[str] = []

    def prepare(self, run):
        self.calls.append("prepare")
        self.config_written_before = (run.path / "config.json").exists()
        if self.config.broken:
            raise ValueError("the toy data are broken")

    def train_teacher(self, run):
        self.calls.append("train_teacher")
        run.folder.mark_started()  # as training a group does (jkd.jobs.group.train_group)
        return Trained("teacher", "teacher", "ce", None, [{"score": 9.0}], "toy")

    def save_teacher(self, run, teacher, path):
        path.mkdir(parents=True)
        atomic_write(path / "weights.json", json.dumps(teacher.weights[0]))

    def load_teacher(self, run, source):
        self.calls.append("load_teacher")
        return Trained("teacher", "teacher", "ce", None, [json.loads((source / "weights.json").read_text())], "toy")

    def students(self, run, teacher):
        self.calls.append("students")
        run.folder.mark_started()
        yield Trained("alone", "student_alone", "ce", None, [{"score": s} for s in self.config.scores], "toy")
        yield Trained("kd", "distilled", "kl", None, [{"score": s + 1} for s in self.config.scores], "toy")

    def measure(self, run, t):
        self.calls.append(f"measure {t.name}")
        return [dict(w) for w in t.weights]

    def entry(self, run, t, per_seed):
        return {"name": t.name, "role": t.role, "loss": t.loss, **mean_std(per_seed)}

    def report(self, run, entries):
        rows = "\n".join(f"| {e['name']} | {e['score_mean']:.2f} |" for e in entries)
        return report.Report(
            "toy run",
            "| model | score |\n|---|---|\n" + rows,
            [verdict(entries[2], entries[1], "score", label="score") + "."],
        )


def test_the_flow_its_summary_and_report(tmp_path):
    job = ToyJob(ToyConfig())
    summary = run_job(job, tmp_path / "run", echo=lambda s: None)
    assert job.calls == ["prepare", "train_teacher", "students", "measure teacher", "measure alone", "measure kd"]
    assert not job.config_written_before  # the data are checked before anything is written
    alone, kd = summary["models"][1], summary["models"][2]
    assert alone["score_mean"] == pytest.approx(1.25) and alone["score_std"] == pytest.approx(0.25)
    assert kd["score_mean"] == pytest.approx(2.25)
    # margin 1.0 against a spread of 0.25: a win, said with both means
    assert summary["notes"] == [
        "kd beats alone on score by more than the seed spread: 2.2500 vs 1.2500 (margin +1.0000, std 0.2500)."
    ]
    text = (tmp_path / "run" / "report.md").read_text()
    assert text.startswith("# toy run\n\n| model | score |") and "| kd | 2.25 |" in text and "- kd beats alone" in text
    assert report.rewrite(tmp_path / "run") == text  # jkd report: the same page from summary.json
    assert json.loads((tmp_path / "run" / "teacher" / "model" / "weights.json").read_text()) == {"score": 9.0}


def test_a_rerun_loads_the_saved_teacher_and_needs_resume(tmp_path):
    run_job(ToyJob(ToyConfig()), tmp_path / "run", echo=lambda s: None)
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_job(ToyJob(ToyConfig()), tmp_path / "run", echo=lambda s: None)
    again = ToyJob(ToyConfig())
    run_job(again, tmp_path / "run", resume=True, echo=lambda s: None)
    assert "load_teacher" in again.calls and "train_teacher" not in again.calls
    from jkd.runtime.run_folder import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match="scores"):
        run_job(ToyJob(ToyConfig(scores=(2.0, 3.0))), tmp_path / "run", resume=True, echo=lambda s: None)


def test_refused_data_write_nothing_and_the_fixed_run_goes_ahead(tmp_path):
    with pytest.raises(ValueError, match="broken"):
        run_job(ToyJob(ToyConfig(broken=True)), tmp_path / "run", echo=lambda s: None)
    assert not (tmp_path / "run" / "config.json").exists()
    job = ToyJob(ToyConfig())
    run_job(job, tmp_path / "run", echo=lambda s: None)  # no --resume or --force needed
    assert job.calls[:2] == ["prepare", "train_teacher"]
    with pytest.raises(ValueError, match="one score per seed"):  # the config is validated first
        run_job(ToyJob(ToyConfig(scores=())), tmp_path / "other", echo=lambda s: None)


def test_a_bad_role_is_refused_before_the_summary_is_written(tmp_path):
    class Wrong(ToyJob):
        def entry(self, run, t, per_seed):
            return {**super().entry(run, t, per_seed), "role": "student" if t.role == "distilled" else t.role}

    with pytest.raises(ValueError, match="role must be one of .* got 'student' for kd"):
        run_job(Wrong(ToyConfig()), tmp_path / "run", echo=lambda s: None)
    assert not (tmp_path / "run" / "summary.json").exists()
