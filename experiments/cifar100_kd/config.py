"""CIFAR-100 distillation with the published recipe (CRD, Tian et al. ICLR 2020; DKD, Zhao et
al. CVPR 2022): soft KD and DKD for one teacher -> student pair.

Commands (CIFAR-100 prepared with `tfds build cifar100 --data_dir=DIR --file_format=array_record`):
    jkd run experiments/cifar100_kd/config.py --set data_dir=DIR                         # resnet32x4 -> resnet8x4
    jkd run experiments/cifar100_kd/config.py --set data_dir=DIR --set teacher.name=wrn_40_2 --set student.name=wrn_16_2
    jkd run experiments/cifar100_kd/config.py --set data_dir=DIR --set teacher.name=resnet56 --set student.name=resnet20
Add `--set parallel=mesh` to use every device. The teacher is trained first (240 epochs, as the
students) unless `--set teacher_dir=...` names a saved one.

Published top-1 (%), teacher / student alone / KD / DKD:
    resnet32x4 -> resnet8x4   79.42 / 72.50 / 73.33 / 76.32
    wrn-40-2   -> wrn-16-2    75.61 / 73.26 / 74.92 / 76.24
    resnet56   -> resnet20    72.34 / 69.06 / 70.66 / 71.97
Recipe: 240 epochs, SGD lr 0.05 momentum 0.9, x0.1 at epochs 150/180/210, weight decay 5e-4,
batch 64, random crop (pad 4) + flip; KD: T=4, kd_weight 0.9, ce_weight 0.1; DKD: ce 1, alpha 1,
beta 8 (the paper uses beta 8 for resnet32x4 -> resnet8x4, 2-8 for the others), T=4, and its
20-epoch linear warm-up of the DKD term.

Expected time: on one modern GPU (H100/A100 class) about 1-2 h per 240-epoch student with the
teacher's forward included (781 steps/epoch at batch 64); the three student settings
(alone, KD, DKD) train one after another. Not run here (CPU only, no CIFAR-100 download); the
tests run this config for a few steps on tfds mock data.
"""

from jkd.jobs.image import Distillation, ExperimentConfig, ModelSpec
from jkd.train import SGDConfig, objectives


def get_config() -> ExperimentConfig:
    sgd = SGDConfig(learning_rate=0.05, momentum=0.9, weight_decay=5e-4, decay_epochs=(150, 180, 210), decay_factor=0.1)
    return ExperimentConfig(
        title="CIFAR-100: resnet32x4 -> resnet8x4 (published recipe)",
        dataset="cifar100",
        teacher=ModelSpec("resnet32x4"),
        student=ModelSpec("resnet8x4"),
        teacher_epochs=240,
        student_epochs=240,
        batch_size=64,
        teacher_optimizer=sgd,
        student_optimizer=sgd,
        teacher_crop_padding=4,
        student_crop_padding=4,
        flip=True,
        seeds=(0,),
        eval_every_epochs=10,
        distillations=(
            Distillation("KD", objectives.SoftKD(temperature=4.0, kd_weight=0.9, ce_weight=0.1)),
            Distillation(
                "DKD",
                objectives.DKD(
                    tckd_weight=1.0, nckd_weight=8.0, temperature=4.0, kd_weight=1.0, ce_weight=1.0, warmup_epochs=20.0
                ),
            ),
        ),
    )
