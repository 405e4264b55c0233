"""The tutorials run as written, offline in a temporary folder, at a cut size: each ```python block is
executed and each ```bash block run by bash, in order, with jkd's commands on the path. Only the
sizes change: the step counts and the data's sizes are replaced (``SHRINK``), and ``jkd lm distill``
gets one seed, short rows and short answers. What the text promises is then checked on the files
the commands wrote."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"

# the tutorial's sizes -> the test's (the commands are otherwise the page's)
SHRINK = {
    '"train": 1000, "test": 100, "unlabelled": 300': '"train": 48, "test": 4, "unlabelled": 8',
    "--teacher-steps 1000": "--teacher-steps 4",
    "--steps 150": "--steps 2",
    "--labelled-subset 300": "--labelled-subset 16",
    "--seeds 0,1,2": "--seeds 0,1",
}
# every `jkd lm distill` of the page also gets these (later flags win)
TINY_DISTILL = "--batch-size 4 --max-length 96 --max-new-tokens 12 --vocab-size 300 --no-progress"


def blocks(path: Path) -> list[tuple[str, str]]:
    """The page's ```python and ```bash blocks, in order."""
    return re.findall(r"```(python|bash)\n(.*?)```", path.read_text(), re.S)


def shrunk(code: str) -> str:
    for big, small in SHRINK.items():
        code = code.replace(big, small)
    return code


ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
WRAPPER = (  # a shell function standing in for `jkd`: the shrunk flags after the page's own
    'jkd() { if [ "$1 $2" = "lm distill" ]; then command jkd "$@" ' + TINY_DISTILL + '; else command jkd "$@"; fi; }\n'
)


def run_page(path: Path, cwd: Path) -> None:
    """Run every block of ``path`` in ``cwd``."""
    here = Path.cwd()
    for kind, code in blocks(path):
        code = shrunk(code)
        if kind == "python":
            os.chdir(cwd)
            try:
                exec(compile(code, str(path), "exec"), {})
            finally:
                os.chdir(here)
            continue
        done = subprocess.run(
            ["bash", "-e", "-c", WRAPPER + code], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{path.name}:\n{code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_the_language_model_tutorial_runs_as_written(tmp_path):
    page = TUTORIALS / "your-language-model.md"
    run_page(page, tmp_path)
    # step 2: the teacher as a Hugging Face folder
    teacher = tmp_path / "runs/tutorial_teacher/teacher/model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (teacher / name).is_file(), name
    # step 3 and 4: the two settings the text names, measured, with a verdict line
    run = tmp_path / "runs/tutorial"
    models = {m["name"]: m for m in json.loads((run / "summary.json").read_text())["models"]}
    assert {"student layers 0,3 alone", "student layers 0,3 sequence fkl"} <= set(models)
    report = (run / "report.md").read_text()
    for column in ("exact match", "tool name", "arguments", "final answer", "test CE", "agrees w/ teacher"):
        assert column in report, column
    assert "by more than the seed spread" in report and (run / "samples.md").is_file()
    assert "8 unlabelled requests" in report  # the shrunk requests, answered by the teacher
    assert "starts from a random initialisation" in report  # the two starts differ: the report says so
    # step 5: the same start on the labels alone
    control = json.loads((tmp_path / "runs/tutorial_control/summary.json").read_text())["models"]
    assert [m["name"] for m in control if m["role"] != "teacher"] == ["student layers 0,3 labels only"]
    assert control[1]["initialisation"] == "teacher layers" and not control[1]["teacher_signal"]
    # step 6 and 7: the folder the text names, measured again and exported
    student = run / "student_layers_0_3_sequence_fkl/seed0"
    assert (student / "config.json").is_file()
    assert "tool_call_exact_match" in json.loads((run / "evaluate.json").read_text())
    assert (run / "student.gguf").read_bytes()[:4] == b"GGUF"
    # step 5: another setting in the same folder is refused, naming what differs as the text shows it
    command = next(code for kind, code in blocks(page) if "--run-dir runs/tutorial\n" in code + "\n")
    changed = shrunk(command).replace("--steps 2", "--steps 3")
    done = subprocess.run(
        ["bash", "-c", WRAPPER + changed], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "student_steps (--steps): 2 -> 3" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_the_image_tutorial_runs_as_written():
    """At its own size (it takes well under a minute): the blocks share one session, as the page
    says; the teacher and both students reach what a digit classifier reaches, and the comparison the
    page draws (the distilled student above the one trained alone) holds."""
    scope: dict = {}
    page = TUTORIALS / "first-student.md"
    for kind, code in blocks(page):
        assert kind == "python"
        exec(compile(code, str(page), "exec"), scope)
    assert scope["accuracy"](scope["teacher_graphdef"], scope["teacher"]) > 94
    alone, taught = scope["results"]["alone"], scope["results"]["soft KD"]
    assert len(alone) == len(taught) == 3 and min(alone + taught) > 90
    assert sum(taught) / 3 > sum(alone) / 3
