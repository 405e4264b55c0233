"""One device, a 4-device mesh and 4-device pmap train to the same parameters."""

import jax
import pytest

from jkd.train import objectives, parallel
from tests.train import helpers as H

STEPS = 5


def _run(runner, state, teacher, data):
    for b in data:
        state, metrics = runner(state, b, objectives.SoftKD(temperature=2.0), teacher)
    return state, metrics


def test_four_cpu_devices():
    assert len(jax.devices()) == 4


def _devices_of(tree) -> set:
    return set().union(*(leaf.sharding.device_set for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize("view", [H.NORMALIZE_ONLY, H.CROP_FLIP], ids=["plain", "augmented"])
def test_mesh_equals_one_device(view):
    data = H.batches(STEPS)
    tg, teacher = H.teacher()
    g, s1 = H.student()
    one, _ = _run(parallel.single_device(H.step_fn(g, tg, view_fn=view)), s1, teacher, data)
    _, s4 = H.student()
    four, m = _run(parallel.on_mesh(H.step_fn(g, tg, view_fn=view), parallel.data_mesh(4)), s4, teacher, data)
    assert len(_devices_of(four.params)) == 4  # the step really ran on the 4-device mesh
    assert H.max_abs_diff(one.params, four.params) < 1e-5
    assert H.max_abs_diff(one.batch_stats, four.batch_stats) < 1e-5  # global-batch statistics


@pytest.mark.parametrize("view", [H.NORMALIZE_ONLY, H.CROP_FLIP], ids=["plain", "augmented"])
def test_pmap_equals_one_device(view):
    """With random crops and flips too: each example's view is keyed by its global position,
    not by the device it lands on (each device once folded in its own index)."""
    data = H.batches(STEPS)
    tg, teacher = H.teacher()
    g, s1 = H.student()
    one, m1 = _run(parallel.single_device(H.step_fn(g, tg, view_fn=view)), s1, teacher, data)
    gp, sp = H.student(bn_axis_name=parallel.AXIS)  # BatchNorm averages across devices
    run = parallel.with_pmap(H.step_fn(gp, tg, view_fn=view), 4)
    placed = run.place(sp)  # replicated once; the steps keep it on the devices
    for b in data:
        placed, m4 = run(placed, b, objectives.SoftKD(temperature=2.0), teacher)
    assert isinstance(placed, parallel.Replicated) and len(_devices_of(placed.tree.params)) == 4
    assert m4["loss"].shape == (4,)  # one (equal, pmean-ed) value per device
    four = run.fetch(placed)
    assert H.max_abs_diff(one.params, four.params) < 1e-5
    assert H.max_abs_diff(one.batch_stats, four.batch_stats) < 1e-5
    assert abs(float(m1["loss"]) - float(m4["loss"][0])) < 1e-5
    # The unplaced call (replicate, step, take device 0's copy) gives the same state.
    _, sp = H.student(bn_axis_name=parallel.AXIS)
    again, _ = _run(parallel.with_pmap(H.step_fn(gp, tg, view_fn=view), 4), sp, teacher, data)
    assert H.max_abs_diff(again.params, four.params) == 0.0


@pytest.mark.parametrize("wrap", ["mesh", "pmap"])
def test_batch_not_divisible_by_devices(wrap):
    tg, teacher = H.teacher()
    g, s = H.student()
    runner = (
        parallel.on_mesh(H.step_fn(g, tg), parallel.data_mesh(4))
        if wrap == "mesh"
        else parallel.with_pmap(H.step_fn(g, tg), 4)
    )
    with pytest.raises(ValueError, match="batch size 18 is not divisible"):
        runner(s, H.batches(1, batch_size=18)[0], objectives.SoftKD(), teacher)


def test_bad_device_count():
    with pytest.raises(ValueError, match=r"num_devices must lie in \[1, 4\]"):
        parallel.data_mesh(5)


def test_dropout_draws_the_same_masks_on_one_device_and_under_pmap():
    """jkd's Dropout under pmap draws the global batch's mask with the shared key and keeps its
    rows (flax's draws a local mask per device: other units dropped than on one device)."""
    import functools

    from jkd.models import create_model
    from jkd.train import create_train_state, train_step

    def model(axis_name=None):
        m = create_model(
            "mlp", num_classes=4, input_shape=H.SHAPE, seed=0, hidden=(32, 32), dropout=0.5, bn_axis_name=axis_name
        )
        return create_train_state(m, H.tx(), seed=0)

    data = H.batches(3)
    results = {}
    for name, axis in (("one", None), ("pmap", parallel.AXIS)):
        g, state = model(axis)
        step = functools.partial(train_step, graphdef=g, tx=H.tx(), view_fn=H.CROP_FLIP)
        run = parallel.single_device(step) if axis is None else parallel.with_pmap(step, 4)
        for b in data:
            state, _ = run(state, b, objectives.CrossEntropy(), None)
        results[name] = state
    assert H.max_abs_diff(results["one"].params, results["pmap"].params) < 1e-5
    # Dropout was active: the same model without it ends elsewhere.
    g, state = create_train_state(
        create_model("mlp", num_classes=4, input_shape=H.SHAPE, seed=0, hidden=(32, 32)), H.tx(), seed=0
    )
    run = parallel.single_device(functools.partial(train_step, graphdef=g, tx=H.tx(), view_fn=H.CROP_FLIP))
    for b in data:
        state, _ = run(state, b, objectives.CrossEntropy(), None)
    plain = state
    assert H.max_abs_diff(results["one"].params, plain.params) > 1e-3


def test_unreplicate_reads_device_0s_copy_without_a_program_over_the_devices():
    """``x[0]`` on a leaf split over 4 devices compiles a 4-device program (a collective per leaf;
    dozens queued behind a step once deadlocked XLA's CPU rendezvous): the first copy is read from
    the shard that holds it, and stays on the first device."""
    import jax.numpy as jnp
    import numpy as np

    devices = jax.local_devices()[:4]
    tree = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.asarray(7)}
    stacked = parallel.replicate(tree, devices)
    assert len(_devices_of(stacked)) == 4
    back = parallel.unreplicate(stacked)
    assert _devices_of(back) == {devices[0]}
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert int(back["step"]) == 7
