"""Distillation from sparse teacher targets: only the teacher's top-k logits are kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkd.losses import _common as c


def teacher_topk(teacher_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The teacher's ``k`` largest logits and their class indices: ``[..., C] -> 2 x [..., k]``.

    This is what to store once per example for :func:`topk_soft_distillation_loss`.
    """
    t = c.check_floating("teacher_logits", teacher_logits)
    if not isinstance(k, int) or not 1 <= k <= t.shape[-1]:
        raise ValueError(f"k must be an int in [1, {t.shape[-1]}] (num_classes); got {k!r}.")
    return jax.lax.top_k(t, k)


def topk_soft_distillation_loss(
    student_logits: jax.Array,
    teacher_topk_logits: jax.Array,
    teacher_topk_indices: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Soft distillation from the teacher's top-k logits only, per example.

    .. math::
        \ell = T^2 \sum_{j=1}^{k} p_j \big(\log p_j - \log q_{i_j}\big),\quad
        p = \mathrm{softmax}(t_{1..k} / T),\; q = \mathrm{softmax}(s / T)

    How the rest of the mass is handled: the teacher's distribution is *renormalised over
    its k kept classes* (the mass it put on the other classes is dropped), while the
    student's probabilities ``q`` are over *all* classes. The loss is therefore >= 0 and is 0
    only when the student puts all its mass on the teacher's top-k classes, in the teacher's
    proportions: the student is pushed off the classes the teacher ranked below k. With
    ``k = num_classes`` it equals :func:`soft_distillation_loss` exactly.

    Args:
      student_logits: ``[..., num_classes]`` floating point.
      teacher_topk_logits: ``[..., k]`` the teacher's kept logits (bf16 storage is fine).
      teacher_topk_indices: ``[..., k]`` integer class indices of those logits, distinct
        within an example, in ``[0, num_classes)``.
      temperature: ``T > 0``, scalar or broadcastable to ``[...]``.
      where: optional boolean ``[...]``; masked examples give 0 loss and 0 gradient.

    Returns:
      ``[...]`` float32 loss per example.

    Example:
      >>> vals, idx = teacher_topk(jnp.arange(10.0)[None], 3)
      >>> topk_soft_distillation_loss(jnp.zeros((1, 10)), vals, idx, temperature=2.0).shape
      (1,)

    References:
      Soft targets: Hinton et al. 2015, https://arxiv.org/abs/1503.02531. Top-k sparse
      targets as stored teacher outputs: Raman et al. For Distillation, Tokens Are Not All
      You Need. 2023 (and common LLM distillation practice).
    """
    s = c.check_floating("student_logits", student_logits)
    tv = c.check_floating("teacher_topk_logits", teacher_topk_logits)
    idx = jnp.asarray(teacher_topk_indices)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"teacher_topk_indices must be integers; got dtype {idx.dtype}.")
    if tv.shape != idx.shape:
        raise ValueError(
            "teacher_topk_logits and teacher_topk_indices must have the same shape [..., k]; "
            f"got {tv.shape} and {idx.shape}."
        )
    if tv.shape[:-1] != s.shape[:-1] or tv.shape[-1] > s.shape[-1]:
        raise ValueError(
            f"teacher top-k arrays must have shape {s.shape[:-1]} + (k,) with k <= "
            f"{s.shape[-1]} (from student_logits {s.shape}); got {tv.shape}."
        )
    c.check_in_range("teacher_topk_indices", idx, 0, s.shape[-1] - 1)
    c.check_positive("temperature", temperature)
    dtype = c.compute_dtype(s, tv)
    s, tv = s.astype(dtype), tv.astype(dtype)
    where = c.check_where(where, s.shape[:-1])
    s, tv = c.mask_inputs(where, s, tv)
    temp = jnp.asarray(temperature, dtype)
    log_p = jax.nn.log_softmax(tv / temp[..., None], axis=-1)
    log_q = jnp.take_along_axis(jax.nn.log_softmax(s / temp[..., None], axis=-1), idx, axis=-1)
    return c.mask_output(where, temp**2 * c.kl_from_log_probs(log_p, log_q))
