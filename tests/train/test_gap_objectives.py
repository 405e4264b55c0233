"""The objectives of issue 18 inside the train step: function matching on mixed views, DKD's
warm-up, logit standardisation, RKD / SP / CRD with its heads and memory, on 1 and 4 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd.data import augment
from jkd.train import objectives, parallel, with_objective_aux
from jkd.train.steps import teacher_logits
from tests.train import helpers as H

MIXED = functools.partial(augment.augment, mean=(0.5,), std=(0.25,), crop_padding=1, mixup_alpha=1.0)


def _with_aux(state, objective, g, tg, teacher):
    example = H.NORMALIZE_ONLY(jax.random.key(0), np.zeros((2, *H.SHAPE), np.uint8))
    return with_objective_aux(
        state, objective, H.tx(), graphdef=g, teacher_graphdef=tg, teacher=teacher, example=example, seed=0
    )


def _train(runner, state, objective, teacher, data):
    for b in data:
        state, metrics = runner(state, b, objective, teacher)
    return state, metrics


CRD_SMALL = objectives.CRD(embed_dim=8, memory_size=24)  # batch 16: the memory wraps on the 2nd step


@pytest.mark.parametrize(
    "objective,view",
    [
        (objectives.FunctionMatching(), MIXED),
        (CRD_SMALL, H.NORMALIZE_ONLY),
        (objectives.RKD(distance_weight=1.0, angle_weight=2.0), H.NORMALIZE_ONLY),
    ],
    ids=["function-matching-mixup", "crd", "rkd"],
)
def test_batch_level_objectives_on_a_4_device_mesh_equal_one_device(objective, view):
    """Mixup partners, relations (RKD; SP builds its Gram matrix the same way) and CRD's negatives
    span the *global* batch on a mesh: the 4-device run ends where one device does (per-device
    negatives would not, see below)."""
    data = H.batches(2)
    tg, teacher = H.teacher()
    g, s1 = H.student()
    step = H.step_fn(g, tg, view_fn=view)
    one, _ = _train(parallel.single_device(step), _with_aux(s1, objective, g, tg, teacher), objective, teacher, data)
    _, s4 = H.student()
    four, _ = _train(
        parallel.on_mesh(step, parallel.data_mesh(4)),
        _with_aux(s4, objective, g, tg, teacher),
        objective,
        teacher,
        data,
    )
    assert H.max_abs_diff(one.params, four.params) < 1e-5
    if objective is CRD_SMALL:
        assert H.max_abs_diff(one.aux, four.aux) < 1e-5
        assert int(four.aux["state"]["next"]) == (2 * 16) % 24 and bool(np.all(four.aux["state"]["valid"]))
        assert H.max_abs_diff(one.aux["params"], _with_aux(s4, objective, g, tg, teacher).aux["params"]) > 1e-4


def test_crd_negatives_of_the_whole_batch_differ_from_each_shards_own():
    """What the mesh test above protects: CRD over the 16-example batch is not the mean of
    four 4-example CRDs (the PyTorch implementations' per-GPU negatives)."""
    from jkd import losses

    rng = np.random.default_rng(0)
    s, t = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    whole = losses.contrastive_representation_loss(s, t)
    shards = jnp.concatenate(
        [losses.contrastive_representation_loss(s[i : i + 4], t[i : i + 4]) for i in range(0, 16, 4)]
    )
    assert float(jnp.max(jnp.abs(whole - shards))) > 0.1


def test_crd_heads_train_and_the_memory_fills_with_the_batch_embeddings():
    tg, teacher = H.teacher()
    g, s = H.student()
    obj = CRD_SMALL
    s = _with_aux(s, obj, g, tg, teacher)
    assert s.aux["params"]["student"]["kernel"].shape[1] == 8 and not bool(np.any(s.aux["state"]["valid"]))
    b = H.batches(1)[0]
    view = H.NORMALIZE_ONLY(jax.random.key(0), b["image"])  # NORMALIZE_ONLY draws nothing
    _, t_feats = teacher_logits(tg, teacher, view, with_features=True)
    heads = jax.tree.map(np.array, s.aux["params"])  # copies: the step donates the state
    want_t = (
        np.asarray(t_feats["pooled"], np.float64).reshape(16, -1) @ heads["teacher"]["kernel"]
        + heads["teacher"]["bias"]
    )
    new, _ = parallel.single_device(H.step_fn(g, tg))(s, b, obj, teacher)
    np.testing.assert_allclose(new.aux["state"]["teacher"][:16], want_t, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(new.aux["state"]["valid"]) == (np.arange(24) < 16))
    assert H.max_abs_diff(new.aux["params"], heads) > 0  # the heads were trained


def test_dkd_warmup_ramps_the_distillation_weight_from_zero():
    """At step 0 the DKD term has weight 0 (labels only); after the warm-up its full weight."""
    rng = np.random.default_rng(1)
    s, t = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 5), jnp.int32)
    obj = objectives.per_epoch(objectives.DKD(warmup_epochs=2.0), 10)  # 20 steps of warm-up
    ce = objectives.CrossEntropy()(s, t, y)
    full = objectives.DKD()(s, t, y)
    np.testing.assert_allclose(obj(s, t, y, step=jnp.int32(0)), ce, rtol=1e-6)
    np.testing.assert_allclose(obj(s, t, y, step=jnp.int32(20)), full, rtol=1e-6)
    np.testing.assert_allclose(obj(s, t, y, step=jnp.int32(5)), ce + 0.25 * (full - ce), rtol=1e-5)
    with pytest.raises(ValueError, match="needs the epoch length"):
        objectives.DKD(warmup_epochs=2.0)(s, t, y)
    # A calibrated teacher (TeacherTemperature) passes the step on to the DKD it wraps.
    wrapped = objectives.per_epoch(objectives.TeacherTemperature(objectives.DKD(warmup_epochs=2.0), 1.0), 10)
    assert wrapped.takes_step
    np.testing.assert_allclose(wrapped(s, t, y, step=jnp.int32(0)), ce, rtol=1e-6)
    # So does a feature objective around it (RKD here, with its own terms weighted 0).
    rkd = objectives.per_epoch(
        objectives.RKD(base=objectives.DKD(warmup_epochs=2.0), distance_weight=0.0, angle_weight=0.0), 10
    )
    feats = {"pooled": s}
    assert rkd.takes_step and not objectives.RKD().takes_step
    np.testing.assert_allclose(rkd(s, t, y, feats, feats, step=jnp.int32(0)), ce, rtol=1e-6)


def test_logit_standardisation_ignores_the_teachers_scale_in_the_kd_term_only():
    rng = np.random.default_rng(2)
    s, t = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 5), jnp.int32)
    for obj in (objectives.SoftKD(temperature=2.0, standardize=True), objectives.DKD(standardize=True)):
        np.testing.assert_allclose(obj(s, t, y), obj(s, 3 * t - 1, y), rtol=1e-5)  # z-scored teacher
        plain = obj.replace(standardize=False)
        assert float(jnp.max(jnp.abs(plain(s, t, y) - plain(s, 3 * t - 1, y)))) > 1e-3
    # The label term reads the raw logits: with kd_weight 0 standardisation changes nothing.
    ce_only = objectives.SoftKD(kd_weight=0.0, ce_weight=1.0, standardize=True)
    np.testing.assert_allclose(ce_only(s, t, y), objectives.CrossEntropy()(s, t, y), rtol=1e-6)


def _fit_crd(ckpt_dir, num_steps):
    from jkd.data import pipeline as P
    from jkd.train.checkpoint import Checkpoints
    from jkd.train.loop import LoopConfig, fit
    from tests.train.killable_run import dataset

    tg, teacher = H.teacher()
    g, state = H.student()
    state = _with_aux(state, CRD_SMALL, g, tg, teacher)
    ckpts = Checkpoints(ckpt_dir)
    try:
        return fit(
            parallel.single_device(H.step_fn(g, tg, view_fn=H.CROP_FLIP)),
            state,
            CRD_SMALL,
            teacher,
            batches=lambda s: P.train_batches(dataset(), batch_size=16, seed=3, start_step=s),
            checkpoints=ckpts,
            config=LoopConfig(num_steps=num_steps, save_every=3, sync_every=3, progress=False),
        )
    finally:
        ckpts.close()


def test_crd_heads_and_memory_resume_from_the_checkpoint(tmp_path):
    """The heads, the memory and its write position are checkpointed with the student: a run
    stopped at step 3 and resumed ends where the uninterrupted one does."""
    full, _ = _fit_crd(tmp_path / "full", 7)
    _fit_crd(tmp_path / "cut", 3)
    resumed, history = _fit_crd(tmp_path / "cut", 7)
    assert history[0] == {"event": "resumed", "step": 3}
    assert int(resumed.aux["state"]["next"]) == (7 * 16) % 24
    assert H.max_abs_diff(full.params, resumed.params) == 0.0
    assert H.max_abs_diff(full.aux, resumed.aux) == 0.0


def test_configs_that_cannot_mean_what_they_say_are_refused():
    from jkd.jobs.image import Distillation, ExperimentConfig

    def cfg(d, **kw):
        return ExperimentConfig(distillations=(d,), **kw)

    with pytest.raises(ValueError, match="mixed view has no single label.*FunctionMatching"):
        cfg(Distillation("soft", objectives.SoftKD(), mixup_alpha=1.0)).validate()
    with pytest.raises(ValueError, match="use parallel 'mesh'"):
        cfg(Distillation("fm", objectives.FunctionMatching(), mixup_alpha=1.0), parallel="pmap").validate()
    with pytest.raises(ValueError, match="CRD relates the examples of the whole batch"):
        cfg(Distillation("crd", objectives.CRD()), parallel="pmap").validate()
    with pytest.raises(ValueError, match="mixup_alpha must be a finite number >= 0"):
        cfg(Distillation("fm", objectives.FunctionMatching(), mixup_alpha=-1.0)).validate()
    with pytest.raises(ValueError, match="stored teacher outputs need fixed views"):
        cfg(Distillation("soft", objectives.SoftKD(), crop_padding=2), store_teacher_topk=5).validate()


def test_run_folders_of_earlier_configs_still_resume():
    """The fields this issue added default to None, which the run-folder guard reads as absent:
    a demo folder written before them (its config.json without them) is the same run."""
    from jkd.jobs.image import demo_config
    from jkd.runtime.run_folder import config_diff, config_to_json

    new = config_to_json(demo_config())
    old = config_to_json(demo_config())
    for d in old["distillations"]:
        for key in ("crop_padding", "mixup_alpha", "epochs", "optimizer"):
            del d[key]
        for key in ("standardize", "warmup_epochs", "steps_per_epoch"):
            d["objective"].pop(key, None)
    assert config_diff(old, new) == []
    changed = config_to_json(demo_config())
    changed["distillations"][0]["mixup_alpha"] = 1.0
    assert config_diff(old, changed) == ["distillations[0].mixup_alpha: (absent) -> 1.0"]
