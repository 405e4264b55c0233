"""The toy from the article this project started from, done right.

The original: OR-gate inputs [[0,0],[0,1],[1,0],[1,1]], a linear teacher and a linear
student, temperature 2. It took a softmax over a *single* output unit, so every probability
was 1, the distillation loss was constant (its gradient exactly 0), and the teacher was never
trained. Here: two logits (classes 0 and 1), the teacher is trained first on the OR labels,
then the student learns from the teacher's soft targets alone (no labels) at T=2.

Command: `jkd run experiments/source_example/config.py` (a few seconds). Writes result.json in
the run folder: the single-unit loss and its gradient (both constant/zero), the teacher's
accuracy (4/4), and the student's soft-KD loss before and after training, which falls to ~0 as
its tempered probabilities match the teacher's.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from jkd import losses

X = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y = jnp.array([0, 1, 1, 1])  # OR


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    temperature: float = 2.0
    teacher_steps: int = 500
    student_steps: int = 500
    learning_rate: float = 0.1
    seed: int = 0


def get_config():
    return ToyConfig()


def linear(params, x):
    return x @ params["w"] + params["b"]


def init(key, outputs):
    return {"w": 0.1 * jax.random.normal(key, (2, outputs)), "b": jnp.zeros((outputs,))}


def train(params, loss_fn, steps, lr):
    opt = optax.sgd(lr, momentum=0.9)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(steps):
        params, state, loss = step(params, state)
    return params, float(loss)


def main(cfg: ToyConfig, run_dir, *, resume=False, force=False, progress=True):
    k_bug, k_teacher, k_student = jax.random.split(jax.random.key(cfg.seed), 3)
    T = cfg.temperature

    # The original's bug: a softmax over one unit is identically 1, whatever the weights.
    bug_t, bug_s = init(k_bug, 1), init(k_student, 1)
    bug_loss = lambda p: losses.soft_distillation_loss(linear(p, X), linear(bug_t, X), temperature=T).mean()  # noqa: E731
    bug_value, bug_grad = jax.value_and_grad(bug_loss)(bug_s)
    bug_grad_norm = float(optax.tree.norm(bug_grad))

    # Done right: two logits; train the teacher on the labels first.
    teacher = init(k_teacher, 2)
    teacher, teacher_loss = train(
        teacher, lambda p: losses.cross_entropy_loss(linear(p, X), Y).mean(), cfg.teacher_steps, cfg.learning_rate
    )
    teacher_logits = linear(teacher, X)
    teacher_acc = float(jnp.mean(jnp.argmax(teacher_logits, -1) == Y))

    student = init(k_student, 2)
    kd = lambda p: losses.soft_distillation_loss(linear(p, X), teacher_logits, temperature=T).mean()  # noqa: E731
    kd_before = float(kd(student))
    student, kd_after = train(student, kd, cfg.student_steps, cfg.learning_rate)
    student_logits = linear(student, X)
    result = {
        "single_unit_loss": float(bug_value),
        "single_unit_grad_norm": bug_grad_norm,
        "teacher_train_loss": teacher_loss,
        "teacher_accuracy": teacher_acc,
        "student_kd_loss_before": kd_before,
        "student_kd_loss_after": kd_after,
        "student_accuracy": float(jnp.mean(jnp.argmax(student_logits, -1) == Y)),
        "teacher_probs_T": jax.nn.softmax(teacher_logits / T).tolist(),
        "student_probs_T": jax.nn.softmax(student_logits / T).tolist(),
    }
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "result.json").write_text(json.dumps(result, indent=2))
    print(f"original (1 output unit): loss {bug_value:.4f}, gradient norm {bug_grad_norm:.1e} -> nothing to learn")
    print(f"teacher (2 logits, trained on OR): accuracy {teacher_acc:.2f}")
    print(
        f"student, soft KD at T={T:g} only: loss {kd_before:.4f} -> {kd_after:.6f}, "
        f"accuracy {result['student_accuracy']:.2f}"
    )
    for x, pt, ps in zip(X.tolist(), result["teacher_probs_T"], result["student_probs_T"]):
        print(f"  input {x}: teacher p_T = {pt[1]:.3f}, student p_T = {ps[1]:.3f}")
    return result
