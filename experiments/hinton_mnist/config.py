"""Hinton, Vinyals & Dean (2015), MNIST: a 2x1200 teacher (dropout, +-2 px jitter) and a 2x800
student, alone and distilled with soft targets at T=20.

Commands:
    jkd run experiments/hinton_mnist/config.py                        # the embedded 5,000-image sample
    jkd run experiments/hinton_mnist/config.py --set dataset=mnist --set data_dir=DIR   # full MNIST, prepared
    jkd run experiments/hinton_mnist/config_30.py                     # the 30-unit student, T in 2.5-4

Paper (full MNIST, 60k train, 10k test, errors): teacher 67; student 2x800 alone 146;
distilled at T=20: 74. On the embedded sample (4,000 train / 1,000 test) the student is data-
starved, so absolute figures are lower; expected ~2 min on a 2-core CPU. Measured figures: docs/guides/images.md
("The experiments, measured").
"""

import dataclasses

from jkd.jobs.image import Distillation, ModelSpec, demo_config
from jkd.train import objectives


def get_config():
    return dataclasses.replace(
        demo_config(),
        title="Hinton et al. 2015: 2x1200 -> 2x800 on MNIST",
        student=ModelSpec("mlp_2x800"),
        distillations=(
            Distillation("soft KD T=20", objectives.SoftKD(temperature=20.0, kd_weight=0.9, ce_weight=0.1)),
        ),
    )
