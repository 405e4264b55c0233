"""Hinton et al. (2015): the 30-unit student (784-30-10), distilled at T = 2.5 and T = 4
(the paper found T in 2.5-4 best for such a small student).

Command: `jkd run experiments/hinton_mnist/config_30.py`. Expected ~2 min on a 2-core CPU.
"""

import dataclasses

from jkd.jobs.image import Distillation, ModelSpec, demo_config
from jkd.train import objectives


def get_config():
    return dataclasses.replace(
        demo_config(),
        title="Hinton et al. 2015: 2x1200 -> 30 hidden units",
        student=ModelSpec("mlp_30"),
        distillations=tuple(
            Distillation(f"soft KD T={t:g}", objectives.SoftKD(temperature=t, kd_weight=0.9, ce_weight=0.1))
            for t in (2.5, 4.0)
        ),
    )
