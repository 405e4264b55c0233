"""Every distillation method of jkd on the embedded MNIST sample: one teacher, one student, 3 seeds.

Command: `jkd run experiments/leaderboard/config.py` (run folder runs/leaderboard).
Expected: ~11-13 min on a 2-core CPU. The report's table gives each method's test accuracy
(mean +- std over 3 seeds, each with its own initialisation, data order and augmentation), the
fraction of the teacher-student gap it closes (against this run's teacher and student alone)
and its training time per epoch relative to the student alone. Figures in
docs/guides/images.md.

Protocol: the demo's teacher (MLP 2x1200, 20 epochs) and student (784-100-10); every method
trains 40 epochs (the demo's schedule) on the same view, random crops of +-2 pixels, except
function matching, whose view also mixes each image with the next (Beyer et al. 2022). Three
rows train 4x longer (160 epochs), the "patient" half of Beyer et al.'s recipe: the student
alone (so patience alone is measured, not credited to the teacher), soft KD and function
matching; a last student alone trains as long with a 3x learning rate (3e-3), the strongest
baseline found while building this (96.8% at 80 epochs), so no method is credited for a weakly
trained student alone. Weights follow the papers (RKD 25 / 50, SP 3000, CRD 0.8 with tau 0.07, DKD alpha 1
beta 8 T 4, logit standardisation with T 2); DKD's warm-up is scaled from 20 of 240 epochs.
"""

import dataclasses

from jkd.jobs.image import Distillation, ExperimentConfig, demo_config
from jkd.train import objectives as O

EPOCHS = 40
PATIENT = 160
CROP = 2


def methods(epochs: int = EPOCHS, patient: int = PATIENT, tuned=None) -> tuple[Distillation, ...]:
    """The leaderboard's rows (the student alone is the run's baseline); also used by the GPU
    config. ``tuned``: an optimizer for one more student alone at the patient schedule (a
    baseline given the learning rate that suits it, so no method is credited for a weak one)."""
    warmup = round(epochs * 20 / 240, 1)
    return (
        Distillation("soft KD T=8", O.SoftKD(temperature=8.0, kd_weight=0.9, ce_weight=0.1)),
        Distillation(
            "soft KD + logit std. T=2", O.SoftKD(temperature=2.0, kd_weight=0.9, ce_weight=0.1, standardize=True)
        ),
        Distillation("hard KD", O.HardKD(kd_weight=0.5, ce_weight=0.5)),
        Distillation("DKD", O.DKD(tckd_weight=1.0, nckd_weight=8.0, temperature=4.0)),
        Distillation(
            f"DKD + warm-up {warmup:g} ep.",
            O.DKD(tckd_weight=1.0, nckd_weight=8.0, temperature=4.0, warmup_epochs=warmup),
        ),
        Distillation("DKD + logit std.", O.DKD(tckd_weight=1.0, nckd_weight=8.0, temperature=2.0, standardize=True)),
        Distillation("RKD", O.RKD(distance_weight=25.0, angle_weight=50.0)),
        Distillation("SP", O.SP(weight=3000.0)),
        Distillation("CRD", O.CRD(weight=0.8, temperature=0.07)),
        Distillation("function matching", O.FunctionMatching(temperature=1.0), mixup_alpha=1.0),
        Distillation(f"student alone, {patient} ep.", O.CrossEntropy(), epochs=patient),
        Distillation(
            f"soft KD T=8, {patient} ep.", O.SoftKD(temperature=8.0, kd_weight=0.9, ce_weight=0.1), epochs=patient
        ),
        Distillation(
            f"function matching, {patient} ep.", O.FunctionMatching(temperature=1.0), mixup_alpha=1.0, epochs=patient
        ),
    ) + (
        (
            Distillation(
                f"student alone, {patient} ep., lr {tuned.learning_rate:g}",
                O.CrossEntropy(),
                epochs=patient,
                optimizer=tuned,
            ),
        )
        if tuned is not None
        else ()
    )


def get_config() -> ExperimentConfig:
    base = demo_config()
    return ExperimentConfig(
        title="jkd leaderboard: every method on the embedded MNIST sample",
        teacher=base.teacher,
        student=base.student,
        teacher_epochs=base.teacher_epochs,
        student_epochs=EPOCHS,
        student_crop_padding=CROP,
        seeds=(0, 1, 2),
        eval_every_epochs=EPOCHS,  # the report measures test accuracy once, at the end
        distillations=methods(tuned=dataclasses.replace(base.student_optimizer, learning_rate=3e-3)),
    )
