"""Student accuracy over temperature x KD weight, trained as ONE vmapped run of 12 students.

Command: `jkd run experiments/temperature_sweep/config.py` (run folder runs/temperature_sweep).
Expected: ~1-2 min on a 2-core CPU (teacher 20 epochs, then 12 students x 40 epochs in one
step that shares the teacher's forward). Writes sweep.json and sweep_heatmap.png; the
figures measured here are in docs/guides/images.md. kd_weight 0 is the student alone.
"""

import dataclasses

from jkd.jobs.image import demo_config, run_sweep

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
KD_WEIGHTS = (0.0, 0.5, 0.9)


def get_config():
    return dataclasses.replace(demo_config(), title="temperature x KD-weight sweep", distillations=())


def main(cfg, run_dir, *, resume=False, force=False, progress=True):
    return run_sweep(
        cfg, run_dir, temperatures=TEMPERATURES, kd_weights=KD_WEIGHTS, resume=resume, force=force, progress=progress
    )
