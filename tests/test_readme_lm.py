"""The README's language-model example runs as written (offline, in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _lm_block() -> str:
    text = README.read_text()
    start = text.index("## Language models:")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_language_model_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_lm_block(), "README.md", "exec"), scope)
    assert (tmp_path / "runs/lm/tiny/model.safetensors").is_file()
    assert (tmp_path / "runs/lm/tiny/chat_template.jinja").is_file()
    assert scope["logits"].shape == (1, len(scope["chat"].ids), scope["tok"].vocab_size)
    learned = scope["tok"].decode(scope["chat"].ids[scope["learn"]])
    assert "get_weather" in learned and "18 °C." in learned and "temp_c" not in learned
    assert 1 <= scope["out"].lengths[0] <= 32


def _block(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_distillation_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_block("## Distilling a language model"), "README.md", "exec"), scope)
    state, metrics = scope["state"], scope["metrics"]
    assert int(state.step) == 4  # one step of each mode
    assert int(metrics["on_policy"]) in (0, 1) and float(metrics["loss"]) > 0
    assert len(list((tmp_path / "runs/lm/answers").glob("answers-*/batch-*.npz"))) == 1
