"""Structured pruning: unit scores from their formula, masks, the optax transform, and the
smaller dense model whose logits equal the masked one's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd.compress import structured as S
from jkd.models import create_model
from jkd.train import freeze_model
from jkd.train.state import apply_model

SHAPE = (8, 8, 1)


def _model(name, seed=0, **options):
    g, v = freeze_model(create_model(name, num_classes=5, input_shape=SHAPE, seed=seed, **options))
    # Non-trivial BatchNorm statistics and scales, so that eval mode is a real test.
    rng = np.random.default_rng(seed + 1)
    v = v.replace(
        batch_stats=jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype), v.batch_stats),
        params=jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), v.params),
    )
    return g, v


def _logits(g, v, x):
    return np.asarray(apply_model(g, v.params, v.batch_stats, v.rest, x, train=False)[0])


def _leaves(tree):
    return {S.layer_name(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_mlp_scores_follow_the_formula():
    _, v = _model("mlp", hidden=(7, 6))
    p = _leaves(v.params)
    plan = S.plan_for("mlp", v)
    s1, s2 = (np.asarray(s) for s in S.unit_scores(v.params, plan))
    w1, b1, w2, b2, head = (
        p["layers/0/kernel"],
        p["layers/0/bias"],
        p["layers/1/kernel"],
        p["layers/1/bias"],
        p["head/kernel"],
    )
    for u in range(7):
        assert s1[u] == pytest.approx(
            math.sqrt(np.sum(w1[:, u] ** 2) + b1[u] ** 2) * math.sqrt(np.sum(w2[u] ** 2)), rel=1e-5
        )
    for u in range(6):
        assert s2[u] == pytest.approx(
            math.sqrt(np.sum(w2[:, u] ** 2) + b2[u] ** 2) * math.sqrt(np.sum(head[u] ** 2)), rel=1e-5
        )


def test_cnn_scores_are_the_batchnorm_scale_times_what_reads_the_channel():
    _, v = _model("cnn", width=4)
    p = _leaves(v.params)
    s1, s2 = (np.asarray(s) for s in S.unit_scores(v.params, S.plan_for("cnn", v)))
    for c in range(4):
        assert s1[c] == pytest.approx(
            abs(p["bn1/scale"][c]) * math.sqrt(np.sum(p["conv2/kernel"][:, :, c, :] ** 2)), rel=1e-5
        )
    for c in range(8):
        assert s2[c] == pytest.approx(abs(p["bn2/scale"][c]) * math.sqrt(np.sum(p["head/kernel"][c] ** 2)), rel=1e-5)


@pytest.mark.parametrize(
    "name,options,width,kept",
    [
        ("mlp", {"hidden": (7, 6)}, 0.5, (4, 3)),  # ceil(3.5), ceil(3)
        ("mlp_100", {}, 0.25, (25,)),
        ("cnn", {"width": 4}, 0.3, (2, 3)),  # ceil(1.2), ceil(2.4)
    ],
)
def test_masks_keep_the_best_units_and_the_smaller_model_is_the_same_function(name, options, width, kept):
    g, v = _model(name, **options)
    plan = S.plan_for(name, v)
    masks = S.unit_masks(v.params, plan, width)
    assert S.kept_sizes(masks) == kept
    for m, score in zip(masks, S.unit_scores(v.params, plan)):
        m, score = np.asarray(m), np.asarray(score)
        assert score[m].min() >= score[~m].max()  # the kept units are the best ones
    masked = v.replace(params=S.apply_unit_masks(v.params, plan, masks))
    new_options, small = S.shrink(masked, plan, masks)
    sg, _ = freeze_model(create_model(name, num_classes=5, input_shape=SHAPE, **{**options, **new_options}))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, *SHAPE)), jnp.float32)
    np.testing.assert_allclose(_logits(sg, small, x), _logits(g, masked, x), atol=1e-5)
    assert sum(a.size for a in jax.tree.leaves(small.params)) < sum(a.size for a in jax.tree.leaves(v.params))
    # The masked model's pruned units really are silent: their producing weights are zero.
    for grp, m in zip(plan.groups, masks):
        for s in grp.produce:
            if s.collection == "params":
                x_ = np.moveaxis(_leaves(masked.params)[s.leaf], s.axis, 0)
                assert not np.any(x_[~np.asarray(m)])


def test_pruned_units_stay_pruned_when_the_width_shrinks():
    _, v = _model("mlp", hidden=(10,))
    plan = S.plan_for("mlp", v)
    first = S.unit_masks(v.params, plan, 0.8)
    # Revive the pruned units' weights: with `previous`, they still lose.
    bigger = jax.tree.map(lambda x: x * 10.0, v.params)
    second = S.unit_masks(bigger, plan, 0.5, previous=first)
    assert not np.any(np.asarray(second[0]) & ~np.asarray(first[0])) and S.kept_sizes(second) == (5,)


def test_the_transform_prunes_to_the_schedule_while_training():
    g, v = _model("cnn", width=4)
    plan = S.plan_for("cnn", v)
    schedule = lambda step: jnp.minimum(step.astype(jnp.float32) / 4.0, 1.0) * 0.5  # noqa: E731 - half by step 4
    tx = optax.chain(optax.sgd(0.1), S.unit_pruning(plan, schedule, update_every=2))
    params, state = v.params, None
    state = tx.init(params)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, *SHAPE)), jnp.float32)

    def loss(p):
        return jnp.mean(apply_model(g, p, v.batch_stats, v.rest, x, train=False)[0] ** 2)

    seen = []
    for _ in range(7):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        masks = state[1].masks
        seen.append(S.kept_sizes(masks))
        for grp, m in zip(plan.groups, masks):  # pruned units are exactly zero after every update
            for s in grp.produce:
                if s.collection == "params":
                    assert not np.any(np.moveaxis(_leaves(params)[s.leaf], s.axis, 0)[~np.asarray(m)])
    assert seen[0] == (4, 8) and seen[-1] == (2, 4)
    assert all(a[i] >= b[i] for a, b in zip(seen, seen[1:]) for i in range(2))  # never grows back


@pytest.mark.parametrize("width", [0.0, 1.0, -0.5, 1.5])
def test_a_width_outside_zero_one_is_refused(width):
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        S.check_width(width)


def test_a_family_without_a_plan_is_refused_naming_those_with_one():
    _, v = freeze_model(create_model("resnet8", num_classes=5, input_shape=(8, 8, 3)))
    with pytest.raises(ValueError, match=r"'resnet8' cannot be pruned structurally.*mlp.*cnn"):
        S.plan_for("resnet8", v)


def test_compress_refuses_a_family_without_a_plan_before_writing_anything(tmp_path):
    from jkd.jobs.compress import CompressConfig, run_compress
    from jkd.data import load_dataset
    from jkd.saved import ModelSpec, model_meta
    from jkd.train.checkpoint import save_frozen

    spec = load_dataset("jkd_mnist_sample").spec
    for role, name, folder in (("teacher", "mlp_30", "t"), ("student", "resnet8", "s")):
        _, v = freeze_model(create_model(name, num_classes=10, input_shape=spec.image_shape))
        save_frozen(tmp_path / folder, v, model_meta(ModelSpec(name), spec, role))
    with pytest.raises(ValueError, match=r"'resnet8' cannot be pruned structurally"):
        run_compress(
            tmp_path / "s",
            tmp_path / "out",
            teacher_dir=tmp_path / "t",
            config=CompressConfig(),
            progress=False,
            echo=lambda m: None,
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "units,width,multiple,kept",
    [(100, 0.5, 8, 56), (64, 0.7, 8, 48), (32, 0.5, 8, 16), (7, 0.5, 8, 7), (100, 0.5, 1, 50), (10, 0.01, 1, 1)],
)
def test_kept_units_round_up_to_a_multiple_and_never_exceed_the_layer(units, width, multiple, kept):
    assert int(S.kept_count(units, width, multiple)) == kept


def test_masks_with_a_multiple_keep_the_rounded_count():
    _, v = _model("cnn", width=16)  # 16 and 32 channels
    masks = S.unit_masks(v.params, S.plan_for("cnn", v), 0.3, multiple=8)
    assert S.kept_sizes(masks) == (8, 16)  # ceil(4.8) -> 8, ceil(9.6) -> 16
