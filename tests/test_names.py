"""Every ``jkd.<module>.<name>`` that jkd's docstrings and messages tell users to call exists (an
error once sent users to ``jkd.losses.align_vocabularies``, which never did)."""

import importlib
import re
from pathlib import Path

JKD = Path(__file__).resolve().parents[1] / "jkd"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_dotted_jkd_name_in_the_source_exists():
    named = {
        (str(p.relative_to(JKD.parent)), m)
        for p in sorted(JKD.rglob("*.py"))
        for m in re.findall(r"\bjkd(?:\.[A-Za-z_]\w*)+", p.read_text())
    }
    assert len(named) > 50  # the scan sees the references (docstrings, messages, imports)
    missing = sorted((f, m) for f, m in named if not _resolves(m))
    assert not missing, missing


def test_the_image_jobs_first_name_still_imports():
    """Experiment config files written for `jkd.experiment` keep working: it is the image job."""
    import jkd.experiment
    import jkd.jobs.image

    assert jkd.experiment is jkd.jobs.image and jkd.experiment.ExperimentConfig is jkd.jobs.image.ExperimentConfig
