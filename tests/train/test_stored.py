"""Stored teacher outputs: computed once, keyed by example id and view, checked per row."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd.data import augment
from jkd.data import pipeline as P
from jkd.models import create_model
from jkd.train import (
    create_train_state,
    freeze_model,
    objectives,
    stored,
    teacher_logits,
    train_step,
    train_step_stored,
)
from jkd.train.optim import SGDConfig, make_optimizer

SHAPE = (8, 8, 1)


def _data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return P.InMemory(rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32))


def _view(key, images):
    return augment.normalize(images, (0.5,), (0.25,))


def _teacher():
    tg, teacher = freeze_model(create_model("mlp", num_classes=10, input_shape=SHAPE, seed=1, hidden=(32,)))
    fn = jax.jit(lambda images: teacher_logits(tg, teacher, _view(None, images)))
    return tg, teacher, fn


def test_fingerprints_tell_images_apart():
    data = _data()
    fp = stored.fingerprints(data.images)
    assert fp.dtype == np.uint64 and len(np.unique(fp)) == len(fp)
    np.testing.assert_array_equal(stored.fingerprints(data.images.copy()), fp)
    swapped = data.images[:1].copy().reshape(1, -1)
    i, j = 0, int(np.flatnonzero(swapped[0] != swapped[0, 0])[0])  # two pixels that differ
    swapped[0, [i, j]] = swapped[0, [j, i]]  # exchanged: the same pixel values, in other places
    assert stored.fingerprints(swapped.reshape(1, *SHAPE))[0] != fp[0]
    # the rule, written out with Python integers: sum of (x_j + 1) * w_j modulo 2^64
    w = [int(v) for v in stored._position_weights(int(np.prod(SHAPE)))]
    row = [int(v) for v in data.images[3].reshape(-1)]
    assert int(fp[3]) == sum((x + 1) * wj for x, wj in zip(row, w)) % 2**64
    assert all(wj % 2 == 1 for wj in w) and len(set(w)) == len(w)


def test_one_fingerprint_rule_for_pixels_and_tokens():
    """Tokens: only the real ones count (an attention mask), whatever their dtype."""
    tokens = np.array([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9], [5, 6, 7, 0, 0]])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
    a = stored.fingerprints(tokens, mask)
    assert a[0] == a[1]  # padding differs, real tokens equal
    assert a[2] != a[0]  # a real token 0 is not padding
    np.testing.assert_array_equal(stored.fingerprints(tokens.astype(np.int32), mask), a)
    assert stored.fingerprints(tokens)[0] != stored.fingerprints(tokens)[1]


def test_earlier_names_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="use jkd.train.stored.StoredTopK"):
        assert stored.StoredTeacher is stored.StoredTopK
    with pytest.warns(DeprecationWarning, match="use jkd.train.stored.store_sequence_topk"):
        from jkd.train.lm_stored import store_topk
    assert store_topk is stored.store_sequence_topk
    with pytest.warns(DeprecationWarning, match="jkd.train.lm_steps.stored_topk_step"):
        from jkd.train.lm_stored import stored_topk_step  # noqa: F401
    with pytest.raises(AttributeError):
        stored.not_a_name  # noqa: B018


def test_stored_outputs_are_the_teachers_top_k_by_example_id():
    data = _data(53)
    _, _, fn = _teacher()
    out = stored.store_teacher_outputs(fn, data, k=3, view="norm", batch_size=16)  # 53 = 3 x 16 + a padded batch
    logits = np.asarray(fn(data.images), np.float64)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(out.indices, order)
    want = np.take_along_axis(logits, order, axis=1)
    assert out.values.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.values.astype(np.float64), want, rtol=2**-8)  # bf16: 8 bits of mantissa
    assert out.nbytes() == 53 * (3 * 2 + 3 * 4 + 8)


def test_targets_follow_shuffled_batches_and_misalignment_is_refused():
    data = _data(64)
    _, _, fn = _teacher()
    out = stored.store_teacher_outputs(fn, data, k=10, view="norm")
    batches = P.train_batches(data, batch_size=16, seed=3)
    for _ in range(4):  # shuffled order: each row gets its own example's targets
        b = out.targets(next(batches), source="norm")
        np.testing.assert_array_equal(b["teacher_topk_indices"], out.indices[b["index"]])
        np.testing.assert_array_equal(b["teacher_topk_values"][:, 0], out.values[b["index"], 0])
    b = next(batches)
    wrong = {**b, "image": b["image"][::-1].copy()}  # the images no longer match their ids
    with pytest.raises(stored.TeacherOutputMismatch, match="not the ones the teacher's outputs were stored for"):
        out.targets(wrong, source="norm")
    with pytest.raises(stored.TeacherOutputMismatch, match="computed with 'norm', but this step uses 'other'"):
        out.targets(b, source="other")
    with pytest.raises(stored.TeacherOutputMismatch, match="outside the 64 stored examples"):
        out.targets({**b, "index": b["index"] + 64}, source="norm")
    with pytest.raises(ValueError, match="no example ids"):
        out.targets({"image": b["image"], "label": b["label"]}, source="norm")


def test_image_outputs_save_and_load_whole(tmp_path):
    data = _data(20)
    _, _, fn = _teacher()
    out = stored.store_teacher_outputs(fn, data, k=4, view="norm", batch_size=8)
    out.save(tmp_path / "topk.npz")
    back = stored.StoredTopK.load(tmp_path / "topk.npz")
    assert (back.source, back.key, back.values.dtype) == ("norm", "image", jnp.bfloat16)
    np.testing.assert_array_equal(back.values.view(np.uint16), out.values.view(np.uint16))
    np.testing.assert_array_equal(back.indices, out.indices)
    np.testing.assert_array_equal(back.fingerprints, out.fingerprints)
    assert [p.name for p in tmp_path.iterdir()] == ["topk.npz"]


@pytest.mark.parametrize("kw", [{"crop_padding": 2}, {"flip": True}, {"mixup": 0.2}])
def test_random_augmentation_is_refused(kw):
    with pytest.raises(ValueError, match="need fixed views, but random augmentation is on"):
        stored.check_fixed_view(**kw)
    stored.check_fixed_view()  # fixed views pass


def test_stored_step_with_all_classes_equals_online_distillation():
    """k = num_classes and float32 targets: the stored step is the online step, exactly the
    same maths without the teacher's forward pass."""
    data = _data(32)
    tg, teacher, fn = _teacher()
    tx = make_optimizer(
        SGDConfig(learning_rate=0.1, weight_decay=0.0, decay_epochs=()), steps_per_epoch=2, total_steps=4
    )
    graphdef, state = create_train_state(
        create_model("mlp", num_classes=10, input_shape=SHAPE, seed=0, hidden=(16,)), tx, seed=0
    )
    online = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, view_fn=_view, teacher_graphdef=tg))
    offline = jax.jit(functools.partial(train_step_stored, graphdef=graphdef, tx=tx, view_fn=_view))
    a, b = state, jax.tree.map(jnp.copy, state)
    for batch in list(P.train_batches(data, batch_size=16, seed=0, num_epochs=2)):
        values, indices = jax.lax.top_k(fn(batch["image"]), 10)
        a, ma = online(a, batch, objectives.SoftKD(temperature=3.0), teacher)
        b, mb = offline(
            b,
            {**batch, "teacher_topk_values": values, "teacher_topk_indices": indices},
            objectives.StoredSoftKD(temperature=3.0),
        )
        np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
        assert float(ma["agreement"]) == float(mb["agreement"])
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_run_with_stored_teacher_outputs(tmp_path):
    import dataclasses

    from jkd.jobs import image as X

    cfg = dataclasses.replace(
        X.demo_config(),
        teacher_epochs=1,
        student_epochs=2,
        seeds=(0, 1),
        eval_every_epochs=2,
        distillations=X.demo_config().distillations[:1],
        store_teacher_topk=4,
    )
    messages = []
    summary = X.run(cfg, tmp_path / "r", progress=False, echo=messages.append)
    assert any("teacher outputs stored once: top-4 of" in m for m in messages)
    rows = {m["name"]: m for m in summary["models"]}
    assert rows["soft KD T=8"]["test_accuracy_mean"] > 0.5  # it learned, from the stored targets
    with pytest.raises(ValueError, match="random augmentation is on"):
        dataclasses.replace(cfg, student_crop_padding=2).validate()
    with pytest.raises(ValueError, match="support soft KD only; hard KD, DKD need the online teacher"):
        dataclasses.replace(cfg, distillations=X.demo_config().distillations).validate()
