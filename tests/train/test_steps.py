"""Steps: teacher as frozen data, one view, many students, optimizers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd.train import (
    AdamWConfig,
    SGDConfig,
    make_optimizer,
    objectives,
    parallel,
    stack_states,
    train_step_many,
    unstack_state,
)
from jkd.train.state import apply_model
from tests.train import helpers as H


def test_teacher_training_reduces_loss():
    g, state = H.student()
    run = parallel.single_device(H.step_fn(g))
    data = H.batches(30)
    losses = []
    for b in data:
        state, m = run(state, b, objectives.CrossEntropy())
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert int(state.step) == 30


def test_teacher_is_frozen_data():
    tg, teacher = H.teacher()
    g, state = H.student()
    # Not in the optimizer state: it has exactly the student's parameter structure.
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(H.tx().init(state.params))
    before = jax.tree.map(np.asarray, teacher)
    step = H.step_fn(g, tg)
    b = H.batches(1)[0]

    # No gradient reaches the teacher through the distillation loss.
    def loss_wrt_teacher(t):
        _, m = step(state, b, objectives.SoftKD(), t)
        return m["loss"]

    grads = jax.jit(jax.grad(loss_wrt_teacher))(teacher)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(grads))
    parallel.single_device(step)(state, b, objectives.SoftKD(), teacher)
    assert H.max_abs_diff(before, teacher) == 0.0  # untouched, BatchNorm statistics included


def test_teacher_and_student_see_one_view():
    calls = []

    def spy_view(key, images):
        calls.append(1)
        return H.CROP_FLIP(key, images)

    tg, teacher = H.teacher()
    g, state = H.student()
    jax.jit(H.step_fn(g, tg, view_fn=spy_view))(state, H.batches(1)[0], objectives.SoftKD(), teacher)
    assert len(calls) == 1  # one augmentation per batch, consumed by both models

    # And the teacher logits are those of that view: a loss of 0 weight on labels whose KD
    # term is checked against an independent forward pass on the same view.
    b = H.batches(1)[0]
    key = jax.random.fold_in(state.rng, state.step)
    view = H.CROP_FLIP(key, b["image"])
    t_ref, _, _, _ = apply_model(tg, teacher.params, teacher.batch_stats, teacher.rest, view, train=False)
    seen = {}

    def probe(s, t, y):
        seen["t"] = t
        return jnp.zeros(s.shape[:-1])

    H.step_fn(g, tg, view_fn=H.CROP_FLIP)(state, b, probe, teacher)
    np.testing.assert_allclose(seen["t"], t_ref, rtol=1e-6)


@pytest.mark.parametrize("sequential", [False, True])
def test_many_students_equal_separate_runs(sequential):
    tg, teacher = H.teacher()
    seeds, temps = [1, 2, 3], [1.0, 4.0, 8.0]
    data = H.batches(4)
    separate = []
    for seed, T in zip(seeds, temps):
        g, st = H.student(seed=seed)
        run = parallel.single_device(H.step_fn(g, tg, view_fn=H.CROP_FLIP))
        for b in data:
            st, _ = run(st, b, objectives.SoftKD(temperature=T), teacher)
        separate.append(st)
    g, _ = H.student()
    many = stack_states([H.student(seed=s)[1] for s in seeds])
    objs = objectives.stack([objectives.SoftKD(temperature=T) for T in temps])
    run_many = jax.jit(
        H.step_fn(g, tg, view_fn=H.CROP_FLIP, step=functools.partial(train_step_many, sequential=sequential))
    )
    for b in data:
        many, metrics = run_many(many, b, objs, teacher)
    assert metrics["loss"].shape == (3,)
    for k in range(3):
        assert H.max_abs_diff(unstack_state(many, k).params, separate[k].params) < 1e-5


@pytest.mark.parametrize("sequential", [False, True])
def test_independent_students_equal_separate_runs_on_their_own_data(sequential):
    """per_student_batches: each seed its own batches, augmentation key and teacher pass."""
    tg, teacher = H.teacher()
    seeds, temps = [1, 2, 3], [1.0, 4.0, 8.0]
    data = {s: H.batches(3, seed=10 + s) for s in seeds}
    separate = []
    for seed, T in zip(seeds, temps):
        g, st = H.student(seed=seed, state_seed=seed)
        run = parallel.single_device(H.step_fn(g, tg, view_fn=H.CROP_FLIP))
        for b in data[seed]:
            st, _ = run(st, b, objectives.SoftKD(temperature=T), teacher)
        separate.append(st)
    g, _ = H.student()
    many = stack_states([H.student(seed=s, state_seed=s)[1] for s in seeds])
    objs = objectives.stack([objectives.SoftKD(temperature=T) for T in temps])
    step = functools.partial(train_step_many, sequential=sequential, per_student_batches=True)
    run_many = jax.jit(H.step_fn(g, tg, view_fn=H.CROP_FLIP, step=step))
    for i in range(3):  # [B, K, ...]: the batch axis first, student k's batch in column k
        b = {key: np.stack([data[s][i][key] for s in seeds], axis=1) for key in ("image", "label")}
        many, metrics = run_many(many, b, objs, teacher)
    assert metrics["loss"].shape == (3,)
    for k in range(3):
        assert H.max_abs_diff(unstack_state(many, k).params, separate[k].params) < 1e-5
    # Not the shared protocol: the students' views differed, so their results do too.
    assert H.max_abs_diff(unstack_state(many, 0).params, separate[1].params) > 1e-3


def test_sgd_weight_decay_skips_biases_and_batchnorm():
    opt = make_optimizer(
        SGDConfig(learning_rate=0.1, weight_decay=0.5, momentum=0.0, decay_epochs=()), steps_per_epoch=1, total_steps=1
    )
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "scale": jnp.ones(2)}
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"], 1 - 0.1 * 0.5)  # decayed
    np.testing.assert_allclose(new["bias"], 1.0)
    np.testing.assert_allclose(new["scale"], 1.0)


def _lr_sequence(opt, n):
    p = {"w": jnp.zeros(())}
    state, lrs = opt.init(p), []
    for _ in range(n):
        u, state = opt.update({"w": jnp.ones(())}, state, p)
        lrs.append(-float(u["w"]))
    return np.array(lrs)


def test_sgd_step_decay_schedule():
    opt = make_optimizer(
        SGDConfig(learning_rate=0.1, momentum=0.0, weight_decay=0.0, decay_epochs=(2, 3)),
        steps_per_epoch=2,
        total_steps=8,
    )
    np.testing.assert_allclose(_lr_sequence(opt, 8), [0.1] * 4 + [0.01] * 2 + [0.001] * 2, rtol=1e-5)


def test_adamw_warmup_then_cosine():
    opt = make_optimizer(
        AdamWConfig(learning_rate=1.0, weight_decay=0.0, warmup_epochs=1.0), steps_per_epoch=4, total_steps=20
    )
    lrs = _lr_sequence(opt, 20)  # Adam with a constant gradient: the step is the learning rate
    assert lrs[0] == pytest.approx(0.0, abs=1e-6) and lrs[4] == pytest.approx(1.0, rel=1e-3)
    assert np.all(np.diff(lrs[:5]) > 0) and np.all(np.diff(lrs[5:]) < 0)


def test_bad_optimizer_config():
    with pytest.raises(ValueError, match=r"SGDConfig.learning_rate \(--lr\) must be a finite number > 0; got 0.0"):
        make_optimizer(SGDConfig(learning_rate=0.0), steps_per_epoch=1, total_steps=1)
    for bad in (dict(learning_rate=float("nan")), dict(weight_decay=-1.0), dict(momentum=1.0)):
        with pytest.raises(ValueError, match=f"SGDConfig.{next(iter(bad))}"):
            make_optimizer(SGDConfig(**bad), steps_per_epoch=1, total_steps=1)
    with pytest.raises(TypeError, match="SGDConfig or AdamWConfig"):
        make_optimizer(object(), steps_per_epoch=1, total_steps=1)


@pytest.mark.parametrize("feature_loss", ["attention", "hint"])
def test_feature_distillation_objective(feature_loss):
    from jkd import losses as L

    tg, teacher = H.teacher()
    g, state = H.student()  # width 4 vs the teacher's 8: attention maps still compare
    if feature_loss == "attention":
        obj = objectives.FeatureKD(
            objectives.SoftKD(), weight=100.0, pairs=(("block1", "block1"), ("block2", "block2"))
        )
    else:  # hint between equal shapes: the student against a teacher of its own width
        from jkd.models import create_model
        from jkd.train import freeze_model

        tg, teacher = freeze_model(create_model("cnn", num_classes=4, input_shape=H.SHAPE, seed=5, width=4))
        obj = objectives.FeatureKD(
            objectives.SoftKD(), weight=2.0, pairs=(("pooled", "pooled"),), feature_loss=L.hint_loss
        )
    b = H.batches(1)[0]
    _, m = H.step_fn(g, tg)(state, b, obj, teacher)
    # Independent recomputation of the same loss from the two forward passes.
    view = H.NORMALIZE_ONLY(jax.random.fold_in(state.rng, state.step), b["image"])
    s, sf, _, _ = apply_model(g, state.params, state.batch_stats, state.rest, view, train=True, with_features=True)
    t, tf, _, _ = apply_model(
        tg, teacher.params, teacher.batch_stats, teacher.rest, view, train=False, with_features=True
    )
    # float64 formulas from the papers (tests/losses/reference.py), one example at a time:
    # SoftKD() = 0.9 T^2 KL + 0.1 CE at T = 4, plus the weighted feature terms.
    from tests.losses import reference as R

    s, t, labels = np.asarray(s), np.asarray(t), np.asarray(b["label"])
    logit_term = np.array(
        [0.9 * R.soft_kd(s[i], t[i], 4.0) + 0.1 * R.cross_entropy(s[i], labels[i]) for i in range(len(s))]
    )
    feature_term = np.zeros(len(s))
    for a, c in obj.pairs:
        ref = R.attention_transfer if feature_loss == "attention" else R.hint
        feature_term += obj.weight * np.array([ref(np.asarray(sf[a][i]), np.asarray(tf[c][i])) for i in range(len(s))])
    np.testing.assert_allclose(float(m["loss"]), np.mean(logit_term + feature_term), rtol=1e-5)
    assert np.mean(feature_term) > 1e-3 * np.mean(logit_term)  # the feature term counts


def test_feature_objective_names_a_missing_feature():
    tg, teacher = H.teacher()
    g, state = H.student()
    obj = objectives.FeatureKD(objectives.SoftKD(), pairs=(("stage9", "block2"),))
    with pytest.raises(ValueError, match="the student exposes no feature 'stage9'; it has"):
        H.step_fn(g, tg)(state, H.batches(1)[0], obj, teacher)


def test_eval_step_masked_sums_match_numpy():
    from jkd.data import augment
    from jkd.train import eval_step

    g, state = H.student()
    b = H.batches(1, batch_size=8)[0]
    mask = np.array([True] * 5 + [False] * 3)
    view = functools.partial(augment.normalize, mean=(0.5,), std=(0.25,))
    out = jax.jit(functools.partial(eval_step, graphdef=g, view_fn=view))(state, {**b, "mask": mask})
    logits = np.asarray(out["logits"], np.float64)[mask]
    y = b["label"][mask]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    assert int(out["count"]) == 5
    assert int(out["correct"]) == int(np.sum(logits.argmax(-1) == y))
    np.testing.assert_allclose(float(out["loss_sum"]), -logp[np.arange(5), y].sum(), rtol=1e-5)
    # Eval mode: the same batch gives the same logits again, and nothing is updated.
    again = jax.jit(functools.partial(eval_step, graphdef=g, view_fn=view))(state, {**b, "mask": mask})
    np.testing.assert_array_equal(out["logits"], again["logits"])


def test_adamw_warmup_in_steps():
    """warmup_steps counts optimizer steps, whatever the epoch's length; a bad value is refused by name."""
    opt = make_optimizer(
        AdamWConfig(learning_rate=1.0, weight_decay=0.0, warmup_epochs=5.0, warmup_steps=3),
        steps_per_epoch=4,
        total_steps=20,
    )
    lrs = _lr_sequence(opt, 6)  # Adam with a constant gradient: the step is the learning rate
    np.testing.assert_allclose(lrs[:4], [0, 1 / 3, 2 / 3, 1], atol=1e-3)
    assert lrs[5] < lrs[4] < lrs[3]
    with pytest.raises(ValueError, match=r"warmup_steps \(--warmup-steps\) must be a whole number >= 0; got -1"):
        make_optimizer(AdamWConfig(warmup_steps=-1), steps_per_epoch=4, total_steps=20)
