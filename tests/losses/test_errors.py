"""Bad input raises ValueError/TypeError naming the argument and what was expected."""

import jax
import jax.numpy as jnp
import pytest

from jkd import losses as L

S = jnp.zeros((4, 5))
T = jnp.ones((4, 5))
Y = jnp.array([0, 1, 2, 3])


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: L.soft_distillation_loss(S, jnp.zeros((4, 6))), ValueError, r"same shape.*\(4, 5\).*\(4, 6\)"),
        (lambda: L.soft_distillation_loss(jnp.zeros((4, 5), jnp.int32), T), TypeError, "student_logits.*floating"),
        (lambda: L.hard_distillation_loss(S, jnp.zeros((4, 5), jnp.int8)), TypeError, "teacher_logits.*floating"),
        (lambda: L.soft_distillation_loss(S, T, temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: L.blended_soft_loss(S, T, temperature=-1.0), ValueError, "temperature must be > 0"),
        (
            lambda: L.decoupled_distillation_loss(S, T, Y, temperature=jnp.array([1.0, 0.0, 1.0, 1.0])),
            ValueError,
            "temperature",
        ),
        (lambda: L.blended_soft_loss(S, T, mse_weight=1.5), ValueError, r"mse_weight must lie in \[0.0, 1.0\]"),
        (
            lambda: L.decoupled_distillation_loss(S, T, jnp.array([0, 1, 2, 5])),
            ValueError,
            r"labels must lie in \[0, 4\].*\[0, 5\]",
        ),
        (lambda: L.decoupled_distillation_loss(S, T, jnp.array([0, -1, 2, 3])), ValueError, "labels must lie in"),
        (lambda: L.decoupled_distillation_loss(S, T, jnp.zeros(4)), TypeError, "labels must be integer"),
        (
            lambda: L.decoupled_distillation_loss(S, T, jnp.zeros(3, jnp.int32)),
            ValueError,
            r"labels must have shape \(4,\)",
        ),
        (
            lambda: L.decoupled_distillation_loss(jnp.zeros((4, 1)), jnp.zeros((4, 1)), jnp.zeros(4, jnp.int32)),
            ValueError,
            "num_classes >= 2",
        ),
        (lambda: L.cross_entropy_loss(S, jnp.array([0, 1, 2, 9])), ValueError, "labels must lie"),
        (
            lambda: L.soft_distillation_loss(S, T, where=jnp.ones((3,), bool)),
            ValueError,
            r"where must have shape \(4,\)",
        ),
        (lambda: L.soft_distillation_loss(S, T, where=jnp.ones((4, 5), bool)), ValueError, "where must have shape"),
        (lambda: L.soft_distillation_loss(S, T, where=jnp.ones((4,))), TypeError, "where must be a boolean"),
        (lambda: L.soft_distillation_loss(jnp.float32(1.0), jnp.float32(1.0)), ValueError, "at least one axis"),
        (
            lambda: L.distillation_objective(S, Y, jnp.ones(()), kd_weight=1.0, ce_weight=1.0),
            ValueError,
            r"distillation_term must be per example with shape \(4,\)",
        ),
        (lambda: L.distillation_objective(S, Y, jnp.ones(4), kd_weight=-1.0, ce_weight=1.0), ValueError, "kd_weight"),
        (lambda: L.hint_loss(jnp.zeros((2, 8)), jnp.zeros((2, 16))), ValueError, "regressor"),
        (
            lambda: L.attention_transfer_loss(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 8, 8, 3))),
            ValueError,
            r"\[\.\.\., H, W\]",
        ),
        (lambda: L.teacher_topk(T, 6), ValueError, r"k must be an int in \[1, 5\]"),
        (
            lambda: L.topk_soft_distillation_loss(S, jnp.zeros((4, 2)), jnp.array([[0, 7]] * 4)),
            ValueError,
            "teacher_topk_indices must lie",
        ),
        (
            lambda: L.topk_soft_distillation_loss(S, jnp.zeros((4, 2)), jnp.zeros((4, 3), jnp.int32)),
            ValueError,
            "same shape",
        ),
        (lambda: L.topk_soft_distillation_loss(S, jnp.zeros((4, 2)), jnp.zeros((4, 2))), TypeError, "integers"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_shape_errors_also_raise_under_jit():
    with pytest.raises(ValueError, match="same shape"):
        jax.jit(L.soft_distillation_loss)(S, jnp.zeros((4, 6)))


def test_constant_labels_closed_over_inside_jit_are_checked_not_traced():
    y = jnp.array([0, 1, 2, 3])  # concrete, captured by the jitted function
    out = jax.jit(lambda s: L.cross_entropy_loss(s, y))(S)
    assert out.shape == (4,)
    bad = jnp.array([0, 1, 2, 7])
    with pytest.raises(ValueError, match="labels must lie"):
        jax.jit(lambda s: L.cross_entropy_loss(s, bad))(S)
