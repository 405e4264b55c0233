"""The leaderboard's methods on CIFAR-100 with the published recipe, for a GPU (or a TPU host).

Command (CIFAR-100 prepared with `tfds build cifar100 --data_dir=DIR --file_format=array_record`):
    jkd run experiments/cifar100_kd/config_methods.py --set data_dir=DIR --set parallel=mesh
The same rows as `experiments/leaderboard/config.py` (soft KD, with logit standardisation, hard
KD, DKD with and without its 20-epoch warm-up and logit standardisation, RKD, SP, CRD, function
matching, and the student alone / soft KD / function matching at the patient schedule), on
resnet32x4 -> resnet8x4 with config.py's recipe (240 epochs, SGD, crop 4 + flip). SP reads the
last stage's maps (`stage3`, as the paper); RKD and CRD the pooled features. Patient rows train
4x longer (960 epochs), as Beyer et al.'s function matching needs.

Expected time: about 1-2 h per 240-epoch row on one H100/A100-class GPU, so ~30 h for all rows;
trim `distillations` with `--set` or edit the list for a shorter run. Not run here (CPU only,
no CIFAR-100 download); the tests build this config and check every method is reachable.
"""

import dataclasses
import importlib.util
from pathlib import Path

from jkd.jobs.image import Distillation
from jkd.train import objectives as O


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"jkd_config_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_here = Path(__file__).resolve().parent
_recipe = _load(_here / "config.py")
_leaderboard = _load(_here.parent / "leaderboard" / "config.py")


def _on_cifar(d: Distillation) -> Distillation:
    if isinstance(d.objective, O.SP):
        return dataclasses.replace(d, objective=d.objective.replace(pair=("stage3", "stage3")))
    return d


def get_config():
    cfg = _recipe.get_config()
    return dataclasses.replace(
        cfg,
        title="CIFAR-100: every method, resnet32x4 -> resnet8x4 (published recipe)",
        distillations=tuple(
            _on_cifar(d) for d in _leaderboard.methods(epochs=cfg.student_epochs, patient=4 * cfg.student_epochs)
        ),
    )
