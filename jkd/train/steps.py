"""Pure, module-level step functions: ``step(state, batch, objective, teacher) -> (state, metrics)``.

Bind the static parts (``graphdef``, ``tx``, ``view_fn``) with ``functools.partial`` and jit
once (``jkd.train.parallel`` does this for one device, a mesh, or ``pmap``). The teacher is
frozen data: it runs in eval mode under ``stop_gradient`` on the *same* augmented view as the
student, and is never part of the optimizer state.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jkd import losses
from jkd.data import augment
from jkd.train.state import FrozenModel, TrainState, apply_model

ViewFn = Callable[[jax.Array, jax.Array], jax.Array]  # (keys [B], uint8 images [B, ...]) -> float32 view


def _needs_features(objective) -> bool:
    return bool(getattr(objective, "needs_features", False))


def teacher_logits(teacher_graphdef, teacher: FrozenModel, view: jax.Array, *, with_features: bool = False):
    """The frozen teacher's logits on ``view`` (eval mode, no gradient); with
    ``with_features``, ``(logits, features)``."""
    logits, feats, _, _ = apply_model(
        teacher_graphdef,
        teacher.params,
        teacher.batch_stats,
        teacher.rest,
        view,
        train=False,
        with_features=with_features,
    )
    if with_features:
        return jax.lax.stop_gradient((logits, feats))
    return jax.lax.stop_gradient(logits)


def _teacher_outputs(teacher_graphdef, teacher, view, objective):
    if teacher is None:
        return None, None
    if _needs_features(objective):
        return teacher_logits(teacher_graphdef, teacher, view, with_features=True)
    return teacher_logits(teacher_graphdef, teacher, view), None


def _update(state: TrainState, view, labels, t_out, objective, *, graphdef, tx, axis_name):
    t_logits, t_feats = t_out
    with_features = _needs_features(objective)
    has_aux = bool(getattr(objective, "has_aux", False))  # the objective trains heads and carries state
    extra = {"step": state.step} if getattr(objective, "takes_step", False) else {}

    def loss_fn(trainable):
        params, heads = trainable if has_aux else (trainable, None)
        logits, feats, stats, rest = apply_model(
            graphdef, params, state.batch_stats, state.rest, view, train=True, with_features=with_features
        )
        aux_state = None
        if has_aux:
            per_example, aux_state = objective(
                logits, t_logits, labels, feats, t_feats, heads, state.aux["state"], **extra
            )
        elif with_features:
            per_example = objective(logits, t_logits, labels, feats, t_feats, **extra)
        else:
            per_example = objective(logits, t_logits, labels, **extra)
        return jnp.mean(per_example), (logits, stats, rest, aux_state)

    trainable = (state.params, state.aux["params"]) if has_aux else state.params
    (loss, (logits, stats, rest, aux_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    if axis_name is not None:
        # pmap: the state is mapped (one copy per device), so these are local gradients of
        # the local mean; equal shards make their mean the global batch's gradient.
        grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trained = optax.apply_updates(trainable, updates)
    params, aux = (trained[0], {"params": trained[1], "state": aux_state}) if has_aux else (trained, state.aux)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=stats,
        rest=rest,
        opt_state=opt_state,
        aux=aux,
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
        "grad_norm": optax.tree.norm(grads),
    }
    if isinstance(t_logits, tuple):  # stored top-k targets: the teacher's top-1 class is indices[:, 0]
        metrics["agreement"] = jnp.mean((jnp.argmax(logits, -1) == t_logits[1][..., 0]).astype(jnp.float32))
    elif t_logits is not None:
        metrics["agreement"] = jnp.mean(losses.top1_agreement(logits, t_logits))
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    return new_state, metrics


def with_objective_aux(
    state: TrainState,
    objective,
    tx: optax.GradientTransformation,
    *,
    graphdef,
    teacher_graphdef,
    teacher: FrozenModel,
    example: jax.Array,
    seed: int,
) -> TrainState:
    """``state`` with the heads and state an objective needs (``objective.has_aux``: CRD), sized
    from the features both models give on ``example`` (a view ``[B, ...]``); the optimizer
    then trains ``(params, heads)`` together. Other objectives: ``state`` unchanged."""
    if not getattr(objective, "has_aux", False):
        return state
    s_feats = jax.eval_shape(
        lambda p: apply_model(graphdef, p, state.batch_stats, state.rest, example, train=False, with_features=True)[1],
        state.params,
    )
    t_feats = jax.eval_shape(lambda: teacher_logits(teacher_graphdef, teacher, example, with_features=True)[1])
    aux = objective.init_aux(jax.random.fold_in(jax.random.key(seed), 0xC0D), s_feats, t_feats)
    return state.replace(aux=aux, opt_state=tx.init((state.params, aux["params"])))


def _view(state_rng, step, images, view_fn, axis_name):
    """The view of a batch: each example draws from ``fold_in(fold_in(rng, step), position)``,
    its position in the *global* batch, so every device count draws the same views."""
    key = jax.random.fold_in(state_rng, step)
    first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * images.shape[0]  # pmap shard
    return view_fn(augment.example_keys(key, images.shape[0], first), images)


# Where the teacher's targets come from: the one thing the step variants differ in.
# ``targets(view, batch, teacher, objective) -> (teacher logits or (values, indices), features)``.
Targets = Callable[[jax.Array, dict, object, Callable], tuple]


def online_targets(teacher_graphdef) -> Targets:
    """The frozen teacher run on the step's view (``(None, None)`` without a teacher)."""
    return lambda view, batch, teacher, objective: _teacher_outputs(teacher_graphdef, teacher, view, objective)


def stored_targets(view, batch, teacher, objective):
    """``((values, indices), None)``: the stored top-k teacher targets a batch carries."""
    if teacher is not None:
        raise ValueError(
            "the stored-output steps run without the teacher; pass teacher=None (its outputs are in the batch)."
        )
    return (batch["teacher_topk_values"], batch["teacher_topk_indices"]), None


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    objective: Callable,
    teacher: FrozenModel | None = None,
    *,
    graphdef,
    tx: optax.GradientTransformation,
    view_fn: ViewFn,
    teacher_graphdef=None,
    axis_name: str | None = None,
    targets: Targets | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step of one model: the step body every variant below shares.

    With ``teacher=None`` this trains a teacher or the student alone (use
    ``objectives.CrossEntropy``); with a teacher it distils (``SoftKD``, ``HardKD``, ``DKD`` or
    any ``objective(student_logits, teacher_logits, labels) -> [B]``).

    Args:
      state: the model's :class:`TrainState`.
      batch: ``{"image": uint8 [B, H, W, C], "label": int32 [B]}``.
      objective: the per-example loss.
      teacher: frozen teacher variables, or None.
      graphdef, tx, view_fn, teacher_graphdef: static; bind them with ``functools.partial``.
      axis_name: the ``pmap`` axis (gradients and metrics are averaged over it), else None.
      targets: where the teacher's targets come from (default :func:`online_targets`).
    """
    targets = online_targets(teacher_graphdef) if targets is None else targets
    view = _view(state.rng, state.step, batch["image"], view_fn, axis_name)
    t_out = targets(view, batch, teacher, objective)
    return _update(state, view, batch["label"], t_out, objective, graphdef=graphdef, tx=tx, axis_name=axis_name)


def train_step_stored(
    state: TrainState,
    batch: dict[str, jax.Array],
    objective: Callable,
    teacher: None = None,
    *,
    graphdef,
    tx: optax.GradientTransformation,
    view_fn: ViewFn,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """:func:`train_step` from stored teacher outputs: no teacher forward pass.

    ``batch`` carries ``teacher_topk_values [B, k]`` and ``teacher_topk_indices [B, k]``
    (attached and checked by :func:`jkd.train.stored.with_teacher_targets`); ``objective`` takes
    them as ``(values, indices)`` (e.g. ``objectives.StoredSoftKD``). ``view_fn`` must be the
    fixed view the outputs were stored on; ``teacher`` must be None.
    """
    return train_step(
        state,
        batch,
        objective,
        teacher,
        graphdef=graphdef,
        tx=tx,
        view_fn=view_fn,
        axis_name=axis_name,
        targets=stored_targets,
    )


def train_step_many(
    states: TrainState,
    batch: dict[str, jax.Array],
    objectives: Callable,
    teacher: FrozenModel | None = None,
    *,
    graphdef,
    tx: optax.GradientTransformation,
    view_fn: ViewFn,
    teacher_graphdef=None,
    axis_name: str | None = None,
    sequential: bool | None = None,
    per_student_batches: bool = False,
    targets: Targets | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """K students in one step: ``states`` and ``objectives`` carry a leading axis K.

    The batch's view and the teacher's forward pass are computed once and shared; the
    students' forward and backward passes are ``vmap``-ed, or with ``sequential=True`` run one
    after another inside the same step (unrolled: compile time grows with K). ``vmap`` turns K
    convolutions into one grouped convolution, fast on accelerators but ~2.5x slower than K
    separate runs on XLA's CPU backend (``benchmarks/many_students.py``). ``sequential=None``
    (the default) chooses: unrolled for convolutional students on the CPU, ``vmap`` otherwise.
    Both give the same result. Metrics have shape ``[K]``.

    With ``per_student_batches=True`` the students share nothing: the batch's leaves are
    ``[B, K, ...]`` (student ``k``'s own batch in column ``k``, so the batch axis stays first
    for the mesh and ``pmap`` runners), each student draws its own view from its own key and
    the teacher runs on each view: exactly K separate :func:`train_step` runs (independent
    seeds: initialisation, data order and augmentation), at K teacher forward passes a step.
    """
    targets = online_targets(teacher_graphdef) if targets is None else targets
    if per_student_batches:
        columns = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), batch)  # [K, B, ...]
        one = lambda s, b, o: train_step(
            s,
            b,
            o,
            teacher,
            graphdef=graphdef,
            tx=tx,
            view_fn=view_fn,  # noqa: E731
            axis_name=axis_name,
            targets=targets,
        )
        return _each_student(one, states, objectives, sequential, columns)
    view = _view(states.rng[0], states.step[0], batch["image"], view_fn, axis_name)
    t_out = targets(view, batch, teacher, objectives)
    update = lambda s, o: _update(s, view, batch["label"], t_out, o, graphdef=graphdef, tx=tx, axis_name=axis_name)  # noqa: E731
    return _each_student(update, states, objectives, sequential)


def train_step_many_stored(
    states: TrainState,
    batch: dict[str, jax.Array],
    objectives: Callable,
    teacher: None = None,
    *,
    graphdef,
    tx: optax.GradientTransformation,
    view_fn: ViewFn,
    axis_name: str | None = None,
    sequential: bool | None = None,
    per_student_batches: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """:func:`train_step_many` from stored teacher outputs (see :func:`train_step_stored`)."""
    return train_step_many(
        states,
        batch,
        objectives,
        teacher,
        graphdef=graphdef,
        tx=tx,
        view_fn=view_fn,
        axis_name=axis_name,
        sequential=sequential,
        per_student_batches=per_student_batches,
        targets=stored_targets,
    )


def _each_student(update, states: TrainState, objectives, sequential: bool | None, batches=None):
    """``update`` of each of K stacked students (with its own column of ``batches`` if given):
    ``vmap``, or K unrolled copies in one step (a ``lax.map`` body ran XLA CPU's convolutions
    ~35x slower, measured)."""
    if sequential is None:  # stacked conv kernels are [K, kh, kw, cin, cout]
        sequential = jax.default_backend() == "cpu" and any(x.ndim == 5 for x in jax.tree.leaves(states.params))
    args = (states, objectives) if batches is None else (states, batches, objectives)
    if sequential:
        k = states.step.shape[0]
        return stack_states([update(*(unstack_state(a, i) for a in args)) for i in range(k)])
    return jax.vmap(update)(*args)


def eval_step(
    variables: FrozenModel | TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef,
    view_fn: Callable[[jax.Array], jax.Array],
) -> dict[str, jax.Array]:
    """Logits and masked sums over one eval batch (eval mode; nothing changes).

    Returns ``logits [B, C]``, ``loss_sum``, ``correct`` and ``count`` (rows where
    ``batch["mask"]`` is True, all rows without a mask).
    """
    view = view_fn(batch["image"])
    logits, _, _, _ = apply_model(graphdef, variables.params, variables.batch_stats, variables.rest, view, train=False)
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones(logits.shape[:1], bool)
    ce = losses.cross_entropy_loss(logits, batch["label"], where=mask)
    correct = jnp.where(mask, jnp.argmax(logits, -1) == batch["label"], False)
    return {
        "logits": logits,
        "loss_sum": jnp.sum(ce),
        "correct": jnp.sum(correct.astype(jnp.int32)),
        "count": jnp.sum(mask.astype(jnp.int32)),
    }


def stack_states(states: list[TrainState]) -> TrainState:
    """K states (e.g. K seeds) -> one state with a leading axis K, for :func:`train_step_many`."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(states: TrainState, k: int) -> TrainState:
    """Student ``k`` of a stacked state."""
    return jax.tree.map(lambda x: x[k], states)
