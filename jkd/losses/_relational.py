"""Relational and contrastive distillation: RKD, similarity preserving, CRD; logit standardisation.

The relational losses compare how the examples of a batch relate to one another, so each
example's value depends on the whole batch: ``[B, ...]`` features in, ``[B]`` out, where
example ``i``'s value is its own row of the relation (its pairs, or the triplets it is the
vertex of) and the batch mean is the paper's loss. ``where`` removes examples from every
relation, not only from the output. Under ``jit`` on a device mesh the batch is the global
one: relations and negatives span every device's examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkd.losses import _common as c


def standardize_logits(logits: jax.Array, *, eps: float = 1e-7) -> jax.Array:
    r"""Z-score each example's logits: ``(z - mean(z)) / (eps + std(z))`` over the last axis.

    Sun et al. 2024 apply this to both teacher and student logits before the tempered softmax,
    so the student matches the teacher's logit *relations* and not their range. ``std`` is the
    sample standard deviation (``n - 1`` in the denominator), as in the authors' code.
    ``[..., C] -> [..., C]`` float32.

    References:
      Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation. CVPR 2024.
      https://arxiv.org/abs/2403.01427
    """
    z = c.check_floating("logits", logits)
    z = z.astype(c.compute_dtype(z))
    if z.shape[-1] < 2:
        raise ValueError(f"standardizing needs at least 2 logits per example; got shape {z.shape}.")
    centered = z - jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.sum(jnp.square(centered), axis=-1, keepdims=True) / (z.shape[-1] - 1)
    # The max() keeps the gradient finite for constant logits (std 0).
    return centered / (eps + jnp.sqrt(jnp.maximum(var, 1e-30)))


def _batch_features(name_s, student_features, name_t, teacher_features, where):
    s = c.check_floating(name_s, student_features)
    t = c.check_floating(name_t, teacher_features)
    if s.ndim < 2 or t.ndim < 2 or s.shape[0] != t.shape[0]:
        raise ValueError(
            f"{name_s} and {name_t} must be [batch, ...] with one batch size; got {s.shape} and {t.shape}."
        )
    dtype = c.compute_dtype(s, t)
    s = s.reshape(s.shape[0], -1).astype(dtype)
    t = t.reshape(t.shape[0], -1).astype(dtype)
    where = c.check_where(where, s.shape[:1])
    valid = jnp.ones(s.shape[:1], bool) if where is None else where
    # Masked rows become 0 before any arithmetic: garbage (NaN) in them cannot reach the loss.
    s, t = jnp.where(valid[:, None], s, 0), jnp.where(valid[:, None], t, 0)
    return s, t, valid, where


def _distinct_pairs(valid: jax.Array) -> jax.Array:
    """``[B, B]``: both examples valid and not the same one."""
    return valid[:, None] & valid[None, :] & ~jnp.eye(valid.shape[0], dtype=bool)


def _huber(x: jax.Array) -> jax.Array:
    """Smooth L1 with threshold 1 (what RKD uses): ``x^2 / 2`` if ``|x| < 1`` else ``|x| - 1/2``."""
    a = jnp.abs(x)
    return jnp.where(a < 1, 0.5 * jnp.square(x), a - 0.5)


def _distances(x: jax.Array, pair: jax.Array) -> jax.Array:
    """``[B, B]`` Euclidean distances, 0 off ``pair`` (a safe sqrt: no NaN gradient at 0)."""
    sq = jnp.sum(jnp.square(x[:, None, :] - x[None, :, :]), axis=-1)
    return jnp.where(pair, jnp.sqrt(jnp.where(pair, jnp.maximum(sq, 1e-12), 1.0)), 0.0)


def rkd_distance_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""RKD distance loss (Park et al. 2019), example ``i``'s share: ``[B, ...] -> [B]``.

    .. math::
        \ell_i = \frac{1}{n - 1} \sum_{j \ne i} \mathrm{huber}\big(\psi_D(s_i, s_j) - \psi_D(t_i, t_j)\big),
        \qquad \psi_D(x_i, x_j) = \frac{\|x_i - x_j\|_2}{\mu}

    with ``mu`` the mean distance over the batch's pairs of distinct examples (per model) and
    ``n`` the number of valid examples; ``mean_i l_i`` is the paper's loss over all ordered
    pairs. The paper's weight is 25 (distance) beside 50 (angle).

    Args:
      student_features: ``[B, ...]``, flattened to ``[B, D_s]``.
      teacher_features: ``[B, ...]``, flattened to ``[B, D_t]`` (widths may differ).
      where: optional boolean ``[B]``; masked examples leave every pair.

    Returns:
      ``[...]`` = ``[B]`` float32, example ``i``'s share (its pairs); the mean is the paper's loss.

    Example:
      >>> rkd_distance_loss(jnp.eye(4), 2 * jnp.eye(4)).shape  # scaled: same relations, loss 0
      (4,)

    References:
      Park, Kim, Lu, Cho. Relational Knowledge Distillation. CVPR 2019.
      https://arxiv.org/abs/1904.05068
    """
    s, t, valid, where = _batch_features(
        "student_features", student_features, "teacher_features", teacher_features, where
    )
    pair = _distinct_pairs(valid)
    n_pairs = jnp.maximum(jnp.sum(pair), 1).astype(s.dtype)
    n = jnp.sum(valid).astype(s.dtype)

    def psi(x):
        d = _distances(x, pair)
        mu = jnp.sum(d) / n_pairs
        return d / jnp.maximum(mu, 1e-12)

    per_pair = jnp.where(pair, _huber(psi(s) - psi(t)), 0.0)
    return c.mask_output(where, jnp.sum(per_pair, axis=1) / jnp.maximum(n - 1, 1.0))


def rkd_angle_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""RKD angle loss (Park et al. 2019), the triplets with vertex ``i``: ``[B, ...] -> [B]``.

    .. math::
        \ell_i = \frac{1}{(n-1)(n-2)} \sum_{j \ne k,\; j, k \ne i}
            \mathrm{huber}\big(\psi_A^s(i; j, k) - \psi_A^t(i; j, k)\big),
        \qquad \psi_A(i; j, k) = \Big\langle \frac{x_j - x_i}{\|x_j - x_i\|}, \frac{x_k - x_i}{\|x_k - x_i\|} \Big\rangle

    ``mean_i l_i`` is the paper's loss over all triplets of distinct examples (the authors'
    code also averages in the degenerate ones, which add 0, so its value is smaller by the
    factor ``(n-1)(n-2)/n^2``). Computed from the batch's Gram matrix: ``[B, B, B]`` memory and
    ``B^2 D + B^3`` work, whatever the feature width.

    Args:
      student_features: ``[B, ...]``, flattened to ``[B, D_s]``.
      teacher_features: ``[B, ...]``, flattened to ``[B, D_t]`` (widths may differ).
      where: optional boolean ``[B]``; masked examples leave every triplet.

    Returns:
      ``[...]`` = ``[B]`` float32, the triplets with vertex ``i``; the mean is the paper's loss.

    Example:
      >>> rkd_angle_loss(jnp.eye(4), jnp.eye(4) + 1.0).shape
      (4,)

    References:
      Park, Kim, Lu, Cho. Relational Knowledge Distillation. CVPR 2019.
      https://arxiv.org/abs/1904.05068
    """
    s, t, valid, where = _batch_features(
        "student_features", student_features, "teacher_features", teacher_features, where
    )
    pair = _distinct_pairs(valid)  # [i, j]: j != i, both valid
    triplet = pair[:, :, None] & pair[:, None, :] & ~jnp.eye(s.shape[0], dtype=bool)[None, :, :]  # [i, j, k]: j != k
    n = jnp.sum(valid).astype(s.dtype)

    def psi(x):
        # From the Gram matrix G = x x^T: <x_j - x_i, x_k - x_i> = G_jk - G_ij - G_ik + G_ii and
        # |x_j - x_i|^2 = G_jj - 2 G_ij + G_ii, so the cost is B^2 D + B^3, not B^3 D.
        g = x @ x.T
        diag = jnp.diagonal(g)
        dot = g[None, :, :] - g[:, :, None] - g[:, None, :] + diag[:, None, None]  # [i, j, k]
        sq = diag[None, :] - 2 * g + diag[:, None]  # [i, j]: |x_j - x_i|^2
        norm = jnp.sqrt(jnp.where(pair, jnp.maximum(sq, 1e-12), 1.0))
        return jnp.where(triplet, dot / (norm[:, :, None] * norm[:, None, :]), 0.0)

    per_triplet = jnp.where(triplet, _huber(psi(s) - psi(t)), 0.0)
    return c.mask_output(where, jnp.sum(per_triplet, axis=(1, 2)) / jnp.maximum((n - 1) * (n - 2), 1.0))


def similarity_preserving_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Similarity-preserving KD (Tung & Mori 2019), example ``i``'s row: ``[B, ...] -> [B]``.

    .. math::
        \ell_i = \frac{1}{n} \sum_j \big(\tilde G^s_{ij} - \tilde G^t_{ij}\big)^2, \qquad
        \tilde G = \mathrm{rownorm}(F F^\top)

    with ``F`` the ``[B, D]`` flattened features and each row of the Gram matrix divided by its
    L2 norm; ``mean_i l_i = ||G~s - G~t||_F^2 / n^2`` is the paper's loss for one layer pair
    (its weight is 3000 on CIFAR).

    Args:
      student_features: ``[B, ...]`` (maps or vectors), flattened.
      teacher_features: ``[B, ...]``, any shape: only the batch sizes must agree.
      where: optional boolean ``[B]``; masked examples leave the Gram matrices.

    Returns:
      ``[...]`` = ``[B]`` float32, row ``i`` of the difference; the mean is the paper's loss.

    Example:
      >>> similarity_preserving_loss(jnp.ones((4, 2, 2, 3)), jnp.ones((4, 7))).shape
      (4,)

    References:
      Tung, Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019.
      https://arxiv.org/abs/1907.09682
    """
    s, t, valid, where = _batch_features(
        "student_features", student_features, "teacher_features", teacher_features, where
    )
    pair = valid[:, None] & valid[None, :]
    n = jnp.maximum(jnp.sum(valid), 1).astype(s.dtype)

    def gram(x):
        g = jnp.where(pair, x @ x.T, 0.0)
        norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(g), axis=1, keepdims=True), 1e-24))
        return g / norm

    return c.mask_output(where, jnp.sum(jnp.square(gram(s) - gram(t)), axis=1) / n)


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-24))


def contrastive_representation_loss(
    student_embeddings: jax.Array,
    teacher_embeddings: jax.Array,
    *,
    student_memory: jax.Array | None = None,
    teacher_memory: jax.Array | None = None,
    memory_valid: jax.Array | None = None,
    temperature: float | jax.Array = 0.07,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Contrastive representation distillation (CRD) in its InfoNCE form, per example: ``[B]``.

    .. math::
        \ell_i = -\tfrac12 \log \frac{e^{\langle s_i, t_i\rangle / \tau}}{\sum_{c \in T_i} e^{\langle s_i, c\rangle / \tau}}
                 -\tfrac12 \log \frac{e^{\langle t_i, s_i\rangle / \tau}}{\sum_{c \in S_i} e^{\langle t_i, c\rangle / \tau}}

    Embeddings are L2-normalised here (``[B, D]``, the outputs of the learned heads). The
    candidates of student anchor ``s_i`` are every valid teacher embedding of the batch
    (``t_i`` the positive, the others negatives) plus the teacher memory ``[M, D]``; the
    teacher anchor's are the student's, symmetrically (CRD's two contrast memories). Under
    ``jit`` on a mesh the batch is the global one, so negatives come from every device.
    Tian et al. train with NCE and a momentum memory of 16,384 entries; the InfoNCE form
    (their critic inside a softmax over 1 positive and ``N`` negatives) is the one the
    paper's own analysis bounds, and needs no estimate of the partition function.

    Args:
      student_embeddings, teacher_embeddings: ``[B, D]``.
      student_memory, teacher_memory: ``[M, D]`` embeddings of earlier batches (no gradient),
        or None for in-batch negatives only.
      memory_valid: ``[M]`` bool, which memory rows are filled (default: all).
      temperature: ``tau > 0`` (the paper uses 0.07).
      where: ``[B]`` bool; masked examples are neither anchors nor negatives.

    Returns:
      ``[...]`` = ``[B]`` float32 loss per anchor pair ``(s_i, t_i)``.

    Example:
      >>> contrastive_representation_loss(jnp.eye(4), jnp.eye(4), temperature=0.1).shape
      (4,)

    References:
      Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020.
      https://arxiv.org/abs/1910.10699
    """
    s, t, valid, where = _batch_features(
        "student_embeddings", student_embeddings, "teacher_embeddings", teacher_embeddings, where
    )
    if s.shape != t.shape:
        raise ValueError(
            f"student_embeddings and teacher_embeddings must have one shape [B, D] (map both with "
            f"their heads first); got {s.shape} and {t.shape}."
        )
    c.check_positive("temperature", temperature)
    if (student_memory is None) != (teacher_memory is None):
        raise ValueError("give both student_memory and teacher_memory, or neither.")
    s, t = _l2_normalize(s), _l2_normalize(t)
    tau = jnp.asarray(temperature, s.dtype)
    b = s.shape[0]
    cand_valid = valid
    mem_s = mem_t = jnp.zeros((0, s.shape[1]), s.dtype)
    if student_memory is not None:
        mem_s = _l2_normalize(jax.lax.stop_gradient(jnp.asarray(student_memory, s.dtype)))
        mem_t = _l2_normalize(jax.lax.stop_gradient(jnp.asarray(teacher_memory, s.dtype)))
        if mem_s.shape != mem_t.shape or mem_s.ndim != 2 or mem_s.shape[1] != s.shape[1]:
            raise ValueError(f"the memories must be [M, {s.shape[1]}] each; got {mem_s.shape} and {mem_t.shape}.")
        mv = jnp.ones(mem_s.shape[:1], bool) if memory_valid is None else jnp.asarray(memory_valid, bool)
        cand_valid = jnp.concatenate([valid, mv])

    def nce(anchor, batch_cands, memory):
        cands = jnp.concatenate([batch_cands, memory])  # [B + M, D]; candidate i is anchor i's positive
        # A large finite negative, not -inf: a masked anchor's row stays finite (and is zeroed below).
        logits = jnp.where(cand_valid[None, :], anchor @ cands.T / tau, -1e9)
        return jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits[:, :b])

    loss = 0.5 * (nce(s, t, mem_t) + nce(t, s, mem_s))
    return c.mask_output(where, jnp.where(valid, loss, 0.0))
