"""The examples of the README and of the documentation run as written (offline, in a temporary
folder), and the documentation covers every public loss."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = ROOT / "docs" / "guides"


def _block(path: Path, heading: str) -> str:
    """The first ```python block after ``heading`` in ``path``."""
    text = path.read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def _run(code: str, where: str) -> dict:
    scope: dict = {}
    exec(compile(code, where, "exec"), scope)
    return scope


def test_the_language_model_guide_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = _run(_block(GUIDES / "language-models.md", "## Decoders, Hugging Face folders"), "language-models.md")
    assert (tmp_path / "runs/lm/tiny/model.safetensors").is_file()
    assert (tmp_path / "runs/lm/tiny/chat_template.jinja").is_file()
    assert scope["logits"].shape == (1, len(scope["chat"].ids), scope["tok"].vocab_size)
    learned = scope["tok"].decode(scope["chat"].ids[scope["learn"]])
    assert "get_weather" in learned and "18 °C." in learned and "temp_c" not in learned
    assert 1 <= scope["out"].lengths[0] <= 32


def test_the_readme_distillation_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = _run(_block(README, "## Language models and agents"), "README.md")
    state, metrics = scope["state"], scope["metrics"]
    assert int(state.step) == 4  # one step of each mode
    assert int(metrics["on_policy"]) in (0, 1) and float(metrics["loss"]) > 0
    assert len(list((tmp_path / "runs/lm/answers").glob("answers-*/batch-*.npz"))) == 1


def test_the_readme_losses_example_and_getting_started_run():
    import jax.numpy as jnp

    scope = _run(_block(README, "## The losses in five lines"), "README.md")
    scope["student_apply"] = lambda params, images: images @ params  # the one name the example leaves to you
    x, w = jnp.ones((4, 3)), jnp.ones((3, 10)) * 0.1
    loss = scope["student_loss"](w, jnp.zeros((4, 10)).at[:, 0].set(2.0), x, jnp.zeros(4, jnp.int32))
    assert loss.shape == () and float(loss) > 0
    scope = _run(_block(ROOT / "docs" / "getting-started.md", "## The library in a few lines"), "getting-started.md")
    assert scope["per_example"].shape == (8,) and scope["loss"].shape == ()


def test_every_public_loss_is_in_the_api_reference():
    """The losses page documents the package whole (``automodule``, its members from ``__all__``):
    every public name of ``jkd.losses`` has a docstring. (``make docs`` builds the page.)"""
    from jkd import losses

    assert ".. automodule:: jkd.losses" in (ROOT / "docs" / "api" / "losses.md").read_text()
    for name in losses.__all__:
        obj = getattr(losses, name)
        assert (obj.__doc__ or "").strip(), f"jkd.losses.{name} has no docstring"


def test_the_cross_tokenizer_guide_example_runs():
    scope = _run(_block(GUIDES / "language-models.md", "## Across tokenizers"), "language-models.md")
    rows, metrics = scope["rows"], scope["metrics"]
    assert 0 < rows.exact < rows.spans  # both kinds of span, on two real BPE tokenizations
    assert int(metrics["spans"]) > 0 and float(metrics["loss"]) > 0
    assert scope["student_tok"].vocab_size == 400 and scope["teacher_tok"].vocab_size == 259
