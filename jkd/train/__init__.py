"""Train state, optimizers, objectives, pure steps and their 1..N-device wrappers.

Stored teacher outputs (``jkd.train.stored``, which reads data with grain) and the language-model
steps (``jkd.train.lm_steps``) are imported where they are used, not here.
"""

from jkd.train import objectives
from jkd.train import parallel
from jkd.train.optim import AdamWConfig
from jkd.train.optim import SGDConfig
from jkd.train.optim import make_optimizer
from jkd.train.state import FrozenModel
from jkd.train.state import TrainState
from jkd.train.state import apply_model
from jkd.train.state import create_train_state
from jkd.train.state import freeze
from jkd.train.state import freeze_model
from jkd.train.steps import eval_step
from jkd.train.steps import stack_states
from jkd.train.steps import teacher_logits
from jkd.train.steps import train_step
from jkd.train.steps import train_step_many
from jkd.train.steps import train_step_many_stored
from jkd.train.steps import train_step_stored
from jkd.train.steps import unstack_state
from jkd.train.steps import with_objective_aux

__all__ = [
    "AdamWConfig",
    "FrozenModel",
    "SGDConfig",
    "TrainState",
    "apply_model",
    "create_train_state",
    "with_objective_aux",
    "eval_step",
    "freeze",
    "freeze_model",
    "make_optimizer",
    "objectives",
    "parallel",
    "stack_states",
    "teacher_logits",
    "train_step",
    "train_step_many",
    "train_step_many_stored",
    "train_step_stored",
    "unstack_state",
]
