"""Distillation across tokenizers: a teacher and a student that do not share a vocabulary.

The two models read the same text cut into different tokens; :mod:`jkd.data.align` groups them
into *spans* (the smallest runs of tokens of each that cover the same characters). Each model's
distribution for a span is its distribution for the span's first token times the probabilities it
gives the span's later tokens (chain rule, the "observed" merge of GOLD): over the first token's
vocabulary, unnormalised, it sums to the probability of the span's own continuation given that it
starts with that token. Per span:

- :func:`uld_distance` (ULD, Boizard et al. 2024): ``sum_i |sort(q)_i - sort(p)_i|``, the two
  distributions sorted in decreasing order and the shorter padded with zeros; it needs no token
  correspondence at all (it is the Wasserstein-1 distance between the two sorted histograms);
- the hybrid of GOLD: a span that is one token on both sides, with the same token string, is
  compared by a same-vocabulary divergence (``ForwardKL()``, ``GeneralizedJSD()``, ...) over the
  tokens both vocabularies hold, each distribution renormalised over them; ULD elsewhere.

On one tokenizer every span is one token with the same string on both sides, every token is
shared, and the hybrid is the same-vocabulary divergence, token by token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkd.losses import _common as c
from jkd.losses._token import Divergence


def _merged_row(logits, targets, first, chain, temperature):
    """``[S, V]``: one row's span log-distributions (see :func:`span_log_probs`)."""
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)  # [T, V]
    tok = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]  # [T]: log p(next token)
    inside = chain >= 0
    later = jax.ops.segment_sum(
        jnp.where(inside, tok, 0.0), jnp.where(inside, chain, 0), num_segments=first.shape[0]
    )  # [S]
    return logp[first] + later[:, None]


def span_log_probs(
    logits: jax.Array, targets: jax.Array, first: jax.Array, chain: jax.Array, *, temperature: float | jax.Array = 1.0
) -> jax.Array:
    r"""Each span's distribution, in log space (unnormalised).

    .. math::
        \log m_s(v) = \log \pi_{f_s}(v) + \sum_{n\,:\,\mathrm{chain}_n = s} \log \pi_n(x_{n+1})

    where ``pi_n = softmax(logits_n / T)`` and ``f_s = first[s]``.

    Args:
      logits: ``[..., T, V]``: the model's logits (position ``n`` predicts token ``n + 1``).
      targets: ``[..., T]`` int: the token each position predicts (the row shifted by one).
      first: ``[..., S]`` int: the position that predicts each span's first token.
      chain: ``[..., T]`` int: for a position that predicts a later token of span ``s``, ``s``;
        -1 elsewhere.
      temperature: ``T > 0``.

    Returns:
      ``[..., S, V]`` float32: for the rows ``[...]``, a log-distribution per span.

    Example:
      >>> logits = jnp.zeros((2, 4, 5))  # uniform: each token has probability 1/5
      >>> m = span_log_probs(logits, jnp.zeros((2, 4), int), jnp.array([[0, 1]] * 2), jnp.array([[-1, -1, 1, -1]] * 2))
      >>> m.shape, round(float(jnp.exp(m[0, 1]).sum()), 4)  # span 1 has two tokens: 1/5 of its mass is left
      ((2, 2, 5), 0.2)

    References:
      Boizard et al. 2024 (ULD), https://arxiv.org/abs/2402.12030; the span merge of TRL's GOLD
      trainer (the "observed" strategy).
    """
    logits = c.check_floating("logits", logits)
    dtype = c.compute_dtype(logits)
    lead = logits.shape[:-2]
    t, v = logits.shape[-2:]
    s = first.shape[-1]
    c.check_positive("temperature", temperature)
    f = jax.vmap(_merged_row, in_axes=(0, 0, 0, 0, None))
    out = f(
        logits.astype(dtype).reshape(-1, t, v),
        jnp.asarray(targets).reshape(-1, t),
        jnp.asarray(first).reshape(-1, s),
        jnp.asarray(chain).reshape(-1, t),
        jnp.asarray(temperature, dtype),
    )
    return out.reshape(*lead, s, v)


def uld_distance(student_log_probs: jax.Array, teacher_log_probs: jax.Array) -> jax.Array:
    r"""ULD's distance between two distributions over different vocabularies.

    .. math::
        \ell = \sum_i \big|\, q_{(i)} - p_{(i)} \big|

    with ``q_(i)`` / ``p_(i)`` the probabilities sorted in decreasing order, the shorter vector
    padded with zeros.

    Args:
      student_log_probs: ``[..., Vs]`` log-probabilities (possibly unnormalised; ``-inf`` entries
        are 0).
      teacher_log_probs: ``[..., Vt]``.

    Returns:
      ``[...]`` float32.

    Example:
      >>> q = jnp.log(jnp.array([0.1, 0.7, 0.2]))
      >>> p = jnp.log(jnp.array([0.5, 0.05, 0.05, 0.4]))
      >>> round(float(uld_distance(q, p)), 4)  # (0.7, 0.2, 0.1, 0) against (0.5, 0.4, 0.05, 0.05)
      0.5

    References:
      Boizard et al. Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss
      for LLMs. 2024. https://arxiv.org/abs/2402.12030
    """
    dtype = c.compute_dtype(jnp.asarray(student_log_probs), jnp.asarray(teacher_log_probs))
    q = jnp.exp(jnp.asarray(student_log_probs, dtype))
    p = jnp.exp(jnp.asarray(teacher_log_probs, dtype))
    q, p = -jnp.sort(-q, axis=-1), -jnp.sort(-p, axis=-1)
    width = max(q.shape[-1], p.shape[-1])
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])  # noqa: E731
    return jnp.sum(jnp.abs(pad(q) - pad(p)), axis=-1)


def _check_hybrid(divergence, shared, exact) -> None:
    if divergence is not None and (shared is None or exact is None):
        raise ValueError(
            "the hybrid loss (a divergence given) needs shared=(teacher_ids, student_ids) and exact=; "
            "jkd.data.align.shared_tokens gives the first, span_layout the second"
        )


def _first_logits(logits, first):
    """``[..., S, V]``: the logits at each span's first position."""
    return jnp.take_along_axis(logits, first[..., None], axis=-2)


def cross_tokenizer_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    student_targets: jax.Array,
    teacher_targets: jax.Array,
    student_first: jax.Array,
    teacher_first: jax.Array,
    student_chain: jax.Array,
    teacher_chain: jax.Array,
    exact: jax.Array | None = None,
    where: jax.Array | None = None,
    divergence: Divergence | None = None,
    shared: tuple[jax.Array, jax.Array] | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    r"""A teacher-student distance per aligned span, across vocabularies.

    .. math::
        \ell_s = \begin{cases} D\big(\bar p_s,\ \bar q_s\big) & \text{span } s \text{ exact (hybrid)} \\
        \sum_i |q_{s(i)} - p_{s(i)}| & \text{otherwise (ULD)} \end{cases}

    with ``p_s`` / ``q_s`` the span distributions of :func:`span_log_probs` and ``bar p_s`` /
    ``bar q_s`` the next-token distributions restricted to the shared tokens and renormalised.

    ULD (:func:`uld_distance`) between the two models' span distributions
    (:func:`span_log_probs`); with ``divergence`` the hybrid of GOLD: on the ``exact`` spans (one
    token on each side, the same token string) ``divergence(p, q)`` between the two next-token
    distributions restricted to the ``shared`` tokens and renormalised over them.

    Args:
      student_logits: ``[..., Ts, Vs]``; teacher_logits: ``[..., Tt, Vt]``.
      student_targets / teacher_targets: ``[..., Ts]`` / ``[..., Tt]`` int, each position's next token.
      student_first / teacher_first: ``[..., S]`` int; student_chain / teacher_chain: ``[..., Ts]`` /
        ``[..., Tt]`` int (:class:`jkd.data.align.SpanLayout`).
      exact: ``[..., S]`` bool (needed with ``divergence``).
      where: ``[..., S]`` bool, the spans to count: others give 0 and no gradient.
      divergence: None for ULD on every span, or a same-vocabulary divergence for the hybrid.
      shared: ``(teacher_ids [M], student_ids [M])``, the tokens both vocabularies hold
        (:func:`jkd.data.align.shared_tokens`; needed with ``divergence``).
      temperature: ``T > 0``, for both models.

    Returns:
      ``[..., S]`` float32 per-span values for the rows ``[...]``; reduce with
      :func:`jkd.losses.token_mean` over ``where`` (the step's span count as ``num_tokens``).

    Example:
      >>> s, t = jnp.zeros((6, 7)), jnp.zeros((5, 11))  # student: 6 positions, 7 tokens; teacher: 5, 11
      >>> v = cross_tokenizer_divergence(s, t, student_targets=jnp.zeros(6, int), teacher_targets=jnp.zeros(5, int),
      ...     student_first=jnp.array([0, 2]), teacher_first=jnp.array([0, 1]),
      ...     student_chain=jnp.array([-1, -1, 1, -1, -1, -1]), teacher_chain=jnp.full(5, -1))
      >>> v.shape
      (2,)

    References:
      Boizard et al. 2024 (ULD), https://arxiv.org/abs/2402.12030; the GOLD trainer of TRL
      (Hugging Face, 2025): span alignment and the hybrid with exact-token matches.
    """
    _check_hybrid(divergence, shared, exact)
    where = None if where is None else c.check_where(where, student_first.shape)
    q = span_log_probs(student_logits, student_targets, student_first, student_chain, temperature=temperature)
    p = span_log_probs(teacher_logits, teacher_targets, teacher_first, teacher_chain, temperature=temperature)
    values = uld_distance(q, p)
    if divergence is not None:
        t_ids, s_ids = (jnp.asarray(x, jnp.int32) for x in shared)
        dtype = c.compute_dtype(jnp.asarray(student_logits), jnp.asarray(teacher_logits))
        temp = jnp.asarray(temperature, dtype)
        s_first = _first_logits(c.check_floating("student_logits", student_logits).astype(dtype), student_first)
        t_first = _first_logits(c.check_floating("teacher_logits", teacher_logits).astype(dtype), teacher_first)
        log_q = jax.nn.log_softmax(jnp.take(s_first, s_ids, axis=-1) / temp, axis=-1)
        log_p = jax.nn.log_softmax(jnp.take(t_first, t_ids, axis=-1) / temp, axis=-1)
        values = jnp.where(exact, divergence(log_p, log_q), values)
    return c.mask_output(where, values)


def _rows_in_chunks(fn, rows: jax.Array, chunk: int, *extra: jax.Array) -> jax.Array:
    """``fn(rows_chunk, *extra_chunks)`` over ``rows [N, ...]`` (and ``extra [N, ...]``) ``chunk``
    rows at a time, each chunk recomputed in the backward pass (:func:`jax.checkpoint`): what
    one chunk builds (``[chunk, vocab]`` logits) is the most that exists at once."""
    n = rows.shape[0]
    pad = (-n) % chunk
    padded = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (rows, *extra)]
    shaped = [x.reshape(-1, chunk, *x.shape[1:]) for x in padded]
    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), shaped)
    return out.reshape(-1, *out.shape[2:])[:n]


def _target_log_probs(hidden, weight, targets, temperature, chunk):
    """``[N]``: ``log softmax(hidden_n @ weight.T / T)[targets_n]``, ``chunk`` rows at a time."""

    def fn(h, t):
        logits = jnp.einsum("nd,vd->nv", h, weight, preferred_element_type=jnp.float32) / temperature
        return jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)

    return _rows_in_chunks(fn, hidden, chunk, targets)


def _later_log_probs(hidden, weight, targets, chain, spans: int, temperature, chunk: int) -> jax.Array:
    """``[B * S]``: per span, the log-probability the model gives the span's later tokens
    (``hidden [B, T, D]``, ``targets`` and ``chain`` ``[B, T]``), ``chunk`` rows of logits at a time."""
    n, t = hidden.shape[0], hidden.shape[1]
    lp = _target_log_probs(
        hidden.reshape(n * t, -1), weight, jnp.asarray(targets).reshape(-1), temperature, chunk
    ).reshape(n, t)
    chain = jnp.asarray(chain)
    inside = chain >= 0
    seg = jnp.where(inside, chain, 0) + (jnp.arange(n) * spans)[:, None]
    return jax.ops.segment_sum(jnp.where(inside, lp, 0.0).reshape(-1), seg.reshape(-1), num_segments=n * spans)


def projected_cross_tokenizer_divergence(
    student_hidden: jax.Array,
    student_weight: jax.Array,
    teacher_hidden: jax.Array,
    teacher_weight: jax.Array,
    *,
    student_targets: jax.Array,
    teacher_targets: jax.Array,
    student_first: jax.Array,
    teacher_first: jax.Array,
    student_chain: jax.Array,
    teacher_chain: jax.Array,
    exact: jax.Array | None = None,
    where: jax.Array | None = None,
    divergence: Divergence | None = None,
    shared: tuple[jax.Array, jax.Array] | None = None,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 128,
) -> jax.Array:
    r""":func:`cross_tokenizer_divergence` from the models' last hidden states and output weights,
    without either model's ``[tokens, vocab]`` logits in memory.

    .. math::
        \ell_s = \mathrm{ULD}\big(m^{\mathrm{student}}_s,\ m^{\mathrm{teacher}}_s\big)
        \ \text{or, on exact spans with a divergence,}\ D(\bar p_s, \bar q_s)

    The logits are formed ``chunk_size`` rows at a time: first the log-probability each position
    gives its next token (the spans' later tokens), then each span's distributions at its first
    position, sorted for ULD; each chunk is recomputed in the backward pass, so the largest array
    is ``[chunk_size, vocab]`` per model, whatever the number of tokens.

    Args:
      student_hidden: ``[B, Ts, D]``; student_weight: ``[Vs, D]`` (``logits = h @ W.T``).
      teacher_hidden: ``[B, Tt, Dt]``; teacher_weight: ``[Vt, Dt]``.
      student_targets: ``[B, Ts]``, and the other arguments (``teacher_targets``, the spans'
        arrays, ``exact``, ``where``, ``divergence``, ``shared``, ``temperature``) as
        :func:`cross_tokenizer_divergence` takes them.
      chunk_size: rows of logits formed at once.

    Returns:
      ``[B, S]`` float32 per-span values for the rows ``[...]`` = ``[B]``, equal to
      :func:`cross_tokenizer_divergence` of the full logits.

    Example:
      >>> hs, ws = jnp.zeros((1, 6, 4)), jnp.zeros((7, 4))
      >>> ht, wt = jnp.zeros((1, 5, 8)), jnp.zeros((11, 8))
      >>> v = projected_cross_tokenizer_divergence(hs, ws, ht, wt, student_targets=jnp.zeros((1, 6), int),
      ...     teacher_targets=jnp.zeros((1, 5), int), student_first=jnp.array([[0, 2]]),
      ...     teacher_first=jnp.array([[0, 1]]), student_chain=jnp.array([[-1, -1, 1, -1, -1, -1]]),
      ...     teacher_chain=jnp.full((1, 5), -1), chunk_size=2)
      >>> v.shape
      (1, 2)

    References:
      Boizard et al. 2024 (ULD), https://arxiv.org/abs/2402.12030; chunking as Levanter's and
      jkd's fused losses do (:func:`jkd.losses.projected_token_divergence`).
    """
    _check_hybrid(divergence, shared, exact)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    c.check_positive("temperature", temperature)
    b, s = student_first.shape
    where = None if where is None else c.check_where(where, (b, s))
    temp = jnp.asarray(temperature, jnp.float32)
    hs, ht = (
        c.check_floating(n, x) for n, x in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden))
    )
    ws, wt = student_weight, teacher_weight

    q_later = _later_log_probs(hs, ws, student_targets, student_chain, s, temp, chunk_size)
    p_later = _later_log_probs(ht, wt, teacher_targets, teacher_chain, s, temp, chunk_size)
    gather = lambda h, f: jnp.take_along_axis(h, jnp.asarray(f)[..., None], axis=1).reshape(b * s, -1)  # noqa: E731
    hs_first, ht_first = gather(hs, student_first), gather(ht, teacher_first)
    ex = jnp.zeros((b * s,), bool) if exact is None else jnp.asarray(exact).reshape(-1)
    t_ids, s_ids = (None, None) if shared is None else (jnp.asarray(x, jnp.int32) for x in shared)

    def per_span(h_s, h_t, later_s, later_t, is_exact):
        ls = jnp.einsum("nd,vd->nv", h_s, ws, preferred_element_type=jnp.float32) / temp
        lt = jnp.einsum("nd,vd->nv", h_t, wt, preferred_element_type=jnp.float32) / temp
        values = uld_distance(
            jax.nn.log_softmax(ls, axis=-1) + later_s[:, None], jax.nn.log_softmax(lt, axis=-1) + later_t[:, None]
        )
        if divergence is not None:
            log_q = jax.nn.log_softmax(jnp.take(ls, s_ids, axis=-1), axis=-1)
            log_p = jax.nn.log_softmax(jnp.take(lt, t_ids, axis=-1), axis=-1)
            values = jnp.where(is_exact, divergence(log_p, log_q), values)
        return values

    values = _rows_in_chunks(per_span, hs_first, chunk_size, ht_first, q_later, p_later, ex).reshape(b, s)
    return c.mask_output(where, values)


STORED_FLOOR = -1e4  # the log-probability that stands for "no such token" in stored span values (exp gives 0)


def teacher_span_values(
    teacher_logits: jax.Array,
    *,
    teacher_targets: jax.Array,
    teacher_first: jax.Array,
    teacher_chain: jax.Array,
    exact: jax.Array | None = None,
    shared_teacher: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    r"""What the teacher contributes to :func:`cross_tokenizer_divergence`, per span, over its
    vocabulary: the scores a stored teacher keeps the top ``k`` of.

    .. math::
        r_s(v) = \begin{cases} \log \bar p_{f_s}(v) & v \text{ shared, span } s \text{ exact (hybrid)} \\
        \log m_s(v) & \text{otherwise} \end{cases}

    with ``m_s`` the span distribution of :func:`span_log_probs` and ``bar p`` the next-token
    distribution renormalised over the shared tokens (:data:`STORED_FLOOR` at the other ids of an
    exact span).

    A span's row is its log-distribution (:func:`span_log_probs`); where ``exact`` (the hybrid),
    the teacher's next-token log-probabilities renormalised over the ``shared_teacher`` ids, at
    those ids, and :data:`STORED_FLOOR` elsewhere. Kept as the top ``k >= V_student`` values with
    their ids, they give :func:`stored_cross_tokenizer_divergence` the student's gradient of the
    full loss exactly: ULD's sorted vectors agree on every entry the student has, and the teacher's
    entries past ``k`` add a constant (their mass); the exact spans keep all ``M <= k`` shared
    tokens.

    Args:
      teacher_logits: ``[..., Tt, Vt]``; teacher_targets, teacher_first, teacher_chain: as
        :func:`span_log_probs` takes them.
      exact: ``[..., S]`` bool, with ``shared_teacher`` ``[M]`` int (the hybrid); None for ULD.
      temperature: ``T > 0``.

    Returns:
      ``[..., S, Vt]`` float32: for the rows ``[...]``, a row of scores per span.

    Example:
      >>> logits = jnp.zeros((4, 5))  # uniform: each token 1/5
      >>> r = teacher_span_values(logits, teacher_targets=jnp.zeros(4, int), teacher_first=jnp.array([0, 1]),
      ...                         teacher_chain=jnp.array([-1, -1, 1, -1]))
      >>> r.shape, round(float(jnp.exp(r[1]).sum()), 4)  # span 1 has two tokens
      ((2, 5), 0.2)

    References:
      Boizard et al. 2024 (ULD), https://arxiv.org/abs/2402.12030; the GOLD trainer of TRL
      (Hugging Face, 2025).
    """
    rows = span_log_probs(teacher_logits, teacher_targets, teacher_first, teacher_chain, temperature=temperature)
    if exact is None:
        return rows
    if shared_teacher is None:
        raise ValueError(
            "the hybrid's stored values (exact= given) need shared_teacher, the teacher ids of the shared tokens"
        )
    ids = jnp.asarray(shared_teacher, jnp.int32)
    first = _first_logits(
        c.check_floating("teacher_logits", teacher_logits).astype(jnp.float32), jnp.asarray(teacher_first)
    ) / jnp.asarray(temperature, jnp.float32)
    shared = jax.nn.log_softmax(jnp.take(first, ids, axis=-1), axis=-1)  # [..., S, M]
    on_shared = jnp.full(rows.shape, STORED_FLOOR, jnp.float32).at[..., ids].set(shared)
    return jnp.where(jnp.asarray(exact)[..., None], on_shared, rows)


def stored_cross_tokenizer_divergence(
    student_hidden: jax.Array,
    student_weight: jax.Array,
    teacher_values: jax.Array,
    teacher_ids: jax.Array,
    *,
    student_targets: jax.Array,
    student_first: jax.Array,
    student_chain: jax.Array,
    exact: jax.Array | None = None,
    where: jax.Array | None = None,
    divergence: Divergence | None = None,
    student_of_teacher: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 128,
) -> jax.Array:
    r""":func:`projected_cross_tokenizer_divergence` against a stored teacher: the top ``k`` of
    :func:`teacher_span_values` per span, computed once (no teacher pass, no sort over its
    vocabulary per step).

    .. math::
        \ell_s = \sum_{i \le k} \big|q_{s(i)} - p_{s(i)}\big| \ \text{(ULD)}
        \quad\text{or}\quad D(\bar p_s, \bar q_s)\ \text{on exact spans (hybrid)}

    With ``k >= min(V_student, V_teacher)`` (and ``k >= M`` shared tokens) the student's gradient
    is that of the full loss: a ULD value is the full one less the teacher's mass past its ``k``
    largest entries (a constant; none when ``k = V_teacher``), an exact span's value is the full
    one. A smaller ``k`` truncates the teacher (no longer exact).

    Args:
      student_hidden: ``[B, Ts, D]``; student_weight: ``[Vs, D]``.
      teacher_values: ``[B, S, k]``, teacher_ids: ``[B, S, k]`` int: the stored top ``k`` of
        :func:`teacher_span_values` and their teacher ids; without ``divergence`` (ULD reads the
        sorted values only) ``teacher_ids`` may be ``[B, S, 0]``.
      student_targets: ``[B, Ts]``, and ``student_first``, ``student_chain``, ``exact``,
        ``where``, ``divergence``, ``temperature``, ``chunk_size`` as
        :func:`projected_cross_tokenizer_divergence` takes them.
      student_of_teacher: ``[Vt]`` int, the student id of each shared teacher id (any value
        elsewhere); needed with ``divergence``.

    Returns:
      ``[B, S]`` float32 per-span values for the rows ``[...]`` = ``[B]``.

    Example:
      >>> hs, ws = jnp.zeros((1, 6, 4)), jnp.zeros((7, 4))  # a uniform student over 7 tokens
      >>> values = jnp.log(jnp.array([[[0.5, 0.3, 0.2] + [1e-9] * 4] * 2]))  # the teacher's sorted top 7
      >>> v = stored_cross_tokenizer_divergence(hs, ws, values, jnp.zeros((1, 2, 7), int),
      ...     student_targets=jnp.zeros((1, 6), int), student_first=jnp.array([[0, 2]]),
      ...     student_chain=jnp.full((1, 6), -1), chunk_size=4)
      >>> v.shape, round(float(v[0, 0]), 4)  # |0.5-1/7| + |0.3-1/7| + |0.2-1/7| + 4 x 1/7
      ((1, 2), 1.1429)

    References:
      Boizard et al. 2024 (ULD), https://arxiv.org/abs/2402.12030; storing a teacher's outputs
      once as :mod:`jkd.train.stored` does.
    """
    if divergence is not None and (student_of_teacher is None or exact is None):
        raise ValueError("the stored hybrid loss (a divergence given) needs student_of_teacher= and exact=")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    c.check_positive("temperature", temperature)
    b, s = student_first.shape
    with_ids = teacher_ids.shape == teacher_values.shape
    if teacher_values.shape[:2] != (b, s) or not (with_ids or teacher_ids.shape == (b, s, 0)):
        raise ValueError(
            f"teacher_values and teacher_ids must be [B, S, k] with [B, S] = {(b, s)} (teacher_ids [B, S, 0] for "
            f"ULD alone); got {teacher_values.shape} and {teacher_ids.shape}"
        )
    if divergence is not None and not with_ids:
        raise ValueError("the stored hybrid loss reads the teacher ids of its exact spans: teacher_ids [B, S, k]")
    where = None if where is None else c.check_where(where, (b, s))
    temp = jnp.asarray(temperature, jnp.float32)
    hs = c.check_floating("student_hidden", student_hidden)
    ws = student_weight
    later = _later_log_probs(hs, ws, student_targets, student_chain, s, temp, chunk_size)
    h_first = jnp.take_along_axis(hs, jnp.asarray(student_first)[..., None], axis=1).reshape(b * s, -1)
    tv = jnp.asarray(teacher_values, jnp.float32).reshape(b * s, -1)
    ex = jnp.zeros((b * s,), bool) if exact is None else jnp.asarray(exact).reshape(-1)
    to_student = None if student_of_teacher is None else jnp.asarray(student_of_teacher, jnp.int32)

    def per_span(h, later_s, values, ids, is_exact):
        ls = jnp.einsum("nd,vd->nv", h, ws, preferred_element_type=jnp.float32) / temp
        out = uld_distance(jax.nn.log_softmax(ls, axis=-1) + later_s[:, None], values)
        if divergence is not None:
            real = values > STORED_FLOOR / 2  # the shared tokens (all of them: k >= M)
            picked = jnp.take_along_axis(ls, jnp.take(to_student, ids, mode="clip"), axis=-1)
            log_q = jax.nn.log_softmax(jnp.where(real, picked, STORED_FLOOR), axis=-1)
            log_p = jax.nn.log_softmax(jnp.where(real, values, STORED_FLOOR), axis=-1)
            out = jnp.where(is_exact, divergence(log_p, log_q), out)
        return out

    if with_ids:
        ti = jnp.asarray(teacher_ids, jnp.int32).reshape(b * s, -1)
        values = _rows_in_chunks(per_span, h_first, chunk_size, later, tv, ti, ex)
    else:  # ULD alone: no ids stored
        values = _rows_in_chunks(lambda h, l, v, e: per_span(h, l, v, None, e), h_first, chunk_size, later, tv, ex)
    values = values.reshape(b, s)
    return c.mask_output(where, values)
