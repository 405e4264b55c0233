"""Cross-tokenizer losses against float64 references written from the papers (ULD: Boizard et al.
2024; the span merge and the hybrid as GOLD defines them), their gradients checked numerically, and
the hybrid on one tokenizer equal to the same-vocabulary divergence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd.losses import (
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    cross_tokenizer_divergence,
    span_log_probs,
    token_divergence,
    uld_distance,
)


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_merged(logits, targets, spans_tokens, temperature):
    """Per span: log pi_{first-1}(v) + sum of log pi_{k-1}(x_k) over the span's later tokens k.
    ``spans_tokens``: each span's token positions (the tokens it covers, in order)."""
    lp = log_softmax64(np.asarray(logits, np.float64) / temperature)
    out = []
    for toks in spans_tokens:
        row = lp[toks[0] - 1].copy()
        for k in toks[1:]:
            row += lp[k - 1, targets[k - 1]]
        out.append(row)
    return np.stack(out)


def ref_uld(q_log, p_log):
    q, p = np.sort(np.exp(q_log))[::-1], np.sort(np.exp(p_log))[::-1]
    n = max(len(q), len(p))
    q, p = np.pad(q, (0, n - len(q))), np.pad(p, (0, n - len(p)))
    return np.abs(q - p).sum()


def ref_kl(p_log, q_log):
    p = np.exp(p_log)
    return float((p * (p_log - q_log)).sum())


# one row: the teacher cuts 8 tokens, the student 9; spans as token positions on each side
T_SPANS = [[1], [2, 3], [4], [5], [6, 7]]
S_SPANS = [[1], [2], [3, 4, 5], [6], [7, 8]]
EXACT = [True, False, False, True, False]


def layout(t_len=8, s_len=9):
    tf = np.array([sp[0] - 1 for sp in T_SPANS], np.int32)
    sf = np.array([sp[0] - 1 for sp in S_SPANS], np.int32)
    tc, sc = np.full(t_len, -1, np.int32), np.full(s_len, -1, np.int32)
    for k, sp in enumerate(T_SPANS):
        tc[[i - 1 for i in sp[1:]]] = k
    for k, sp in enumerate(S_SPANS):
        sc[[i - 1 for i in sp[1:]]] = k
    return dict(teacher_first=tf, student_first=sf, teacher_chain=tc, student_chain=sc)


def data(seed=0, vt=11, vs=7):
    rng = np.random.default_rng(seed)
    t_logits, s_logits = rng.normal(size=(8, vt)) * 2, rng.normal(size=(9, vs)) * 2
    t_tg, s_tg = rng.integers(0, vt, 8), rng.integers(0, vs, 9)
    shared = (np.array([0, 3, 4, 9], np.int32), np.array([1, 0, 6, 2], np.int32))  # teacher id -> student id
    return t_logits, s_logits, t_tg, s_tg, shared


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_span_distributions_and_uld_match_the_float64_reference(temperature):
    t_logits, s_logits, t_tg, s_tg, _ = data()
    lay = layout()
    q = span_log_probs(
        jnp.asarray(s_logits, jnp.float32), s_tg, lay["student_first"], lay["student_chain"], temperature=temperature
    )
    np.testing.assert_allclose(q, ref_merged(s_logits, s_tg, S_SPANS, temperature), rtol=1e-5, atol=1e-5)
    got = cross_tokenizer_divergence(
        jnp.asarray(s_logits, jnp.float32),
        jnp.asarray(t_logits, jnp.float32),
        student_targets=s_tg,
        teacher_targets=t_tg,
        temperature=temperature,
        **lay,
    )
    want = [
        ref_uld(a, b)
        for a, b in zip(
            ref_merged(s_logits, s_tg, S_SPANS, temperature), ref_merged(t_logits, t_tg, T_SPANS, temperature)
        )
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a span of several tokens sums to less than one: the probability of its own continuation
    assert np.exp(np.asarray(q)).sum(-1)[2] < 1 and np.exp(np.asarray(q)).sum(-1)[0] == pytest.approx(1, abs=1e-5)


def test_uld_by_hand():
    q = np.log(np.array([0.1, 0.7, 0.2]))
    p = np.log(np.array([0.5, 0.05, 0.05, 0.4]))
    # sorted: q (0.7, 0.2, 0.1, 0) and p (0.5, 0.4, 0.05, 0.05): |0.2| + |0.2| + |0.05| + |0.05|
    assert float(uld_distance(q, p)) == pytest.approx(0.5, abs=1e-6)
    assert float(uld_distance(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(uld_distance(q, q[[2, 0, 1]])) == pytest.approx(0.0, abs=1e-7)  # blind to which token is which


@pytest.mark.parametrize("divergence", [ForwardKL(), ReverseKL(), GeneralizedJSD(beta=0.5)])
def test_the_hybrid_matches_the_float64_reference(divergence):
    t_logits, s_logits, t_tg, s_tg, shared = data(1)
    got = cross_tokenizer_divergence(
        jnp.asarray(s_logits, jnp.float32),
        jnp.asarray(t_logits, jnp.float32),
        student_targets=s_tg,
        teacher_targets=t_tg,
        exact=np.array(EXACT),
        divergence=divergence,
        shared=shared,
        **layout(),
    )
    qm, pm = ref_merged(s_logits, s_tg, S_SPANS, 1.0), ref_merged(t_logits, t_tg, T_SPANS, 1.0)
    want = []
    for k, ex in enumerate(EXACT):
        if not ex:
            want.append(ref_uld(qm[k], pm[k]))
            continue
        p_log = log_softmax64(t_logits[T_SPANS[k][0] - 1][shared[0]])  # renormalised over the shared tokens
        q_log = log_softmax64(s_logits[S_SPANS[k][0] - 1][shared[1]])
        if isinstance(divergence, ForwardKL):
            want.append(ref_kl(p_log, q_log))
        elif isinstance(divergence, ReverseKL):
            want.append(ref_kl(q_log, p_log))
        else:
            m_log = np.log(0.5 * np.exp(p_log) + 0.5 * np.exp(q_log))
            want.append(0.5 * ref_kl(p_log, m_log) + 0.5 * ref_kl(q_log, m_log))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_on_one_tokenizer_the_hybrid_is_the_same_vocabulary_divergence():
    rng = np.random.default_rng(2)
    t_logits, s_logits = rng.normal(size=(2, 6, 13)).astype(np.float32), rng.normal(size=(2, 6, 13)).astype(np.float32)
    targets = rng.integers(0, 13, (2, 6))
    first = np.broadcast_to(np.arange(5, dtype=np.int32), (2, 5))  # spans: tokens 1..5, one each
    chain = np.full((2, 6), -1, np.int32)
    ids = np.arange(13, dtype=np.int32)
    where = np.array([[True] * 5, [True, True, True, False, False]])
    for div in (ForwardKL(), GeneralizedJSD(beta=0.3)):
        got = cross_tokenizer_divergence(
            s_logits,
            t_logits,
            student_targets=targets,
            teacher_targets=targets,
            student_first=first,
            teacher_first=first,
            student_chain=chain,
            teacher_chain=chain,
            exact=np.ones((2, 5), bool),
            where=where,
            divergence=div,
            shared=(ids, ids),
        )
        want = token_divergence(s_logits[:, :5], t_logits[:, :5], divergence=div, where=where)
        np.testing.assert_array_equal(got, want)


def test_masked_spans_give_zero_and_no_gradient():
    t_logits, s_logits, t_tg, s_tg, shared = data(3)
    where = np.array([True, False, True, False, False])

    def loss(s):
        v = cross_tokenizer_divergence(
            s,
            jnp.asarray(t_logits, jnp.float32),
            student_targets=s_tg,
            teacher_targets=t_tg,
            exact=np.array(EXACT),
            where=where,
            divergence=ForwardKL(),
            shared=shared,
            **layout(),
        )
        return v.sum(), v

    (_, v), g = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(s_logits, jnp.float32))
    assert (np.asarray(v)[~where] == 0).all() and (np.asarray(v)[where] > 0).all()
    # spans 0 and 2 read student positions 0 and 2, 3, 4 (first and chain); no other row gets a gradient
    moved = np.flatnonzero(np.abs(np.asarray(g)).sum(-1) > 0)
    assert moved.tolist() == [0, 2, 3, 4]


@pytest.mark.parametrize("divergence", [None, GeneralizedJSD(beta=0.5)])
def test_gradients_match_finite_differences(divergence):
    from jax.test_util import check_grads

    t_logits, s_logits, t_tg, s_tg, shared = data(4, vt=6, vs=5)
    shared = (np.array([0, 3, 4], np.int32), np.array([1, 0, 2], np.int32))
    with jax.enable_x64():

        def f(s, t):
            return cross_tokenizer_divergence(
                s,
                t,
                student_targets=s_tg,
                teacher_targets=t_tg,
                exact=np.array(EXACT),
                divergence=divergence,
                shared=shared,
                temperature=1.5,
                **layout(),
            )

        check_grads(
            f,
            (jnp.asarray(s_logits, jnp.float64), jnp.asarray(t_logits, jnp.float64)),
            order=1,
            modes=["rev"],
            atol=1e-5,
            rtol=1e-5,
        )


def test_jit_vmap_and_bad_input():
    t_logits, s_logits, t_tg, s_tg, shared = data(5)
    lay = layout()
    kw = dict(student_targets=s_tg, teacher_targets=t_tg, **lay)
    one = cross_tokenizer_divergence(jnp.asarray(s_logits), jnp.asarray(t_logits), **kw)
    batched = jax.jit(jax.vmap(lambda s, t: cross_tokenizer_divergence(s, t, **kw)))(
        jnp.stack([jnp.asarray(s_logits)] * 2), jnp.stack([jnp.asarray(t_logits)] * 2)
    )
    np.testing.assert_allclose(batched[1], one, rtol=1e-6)
    with pytest.raises(ValueError, match="hybrid loss .* needs shared="):
        cross_tokenizer_divergence(jnp.asarray(s_logits), jnp.asarray(t_logits), divergence=ForwardKL(), **kw)
    with pytest.raises(ValueError, match="temperature"):
        cross_tokenizer_divergence(jnp.asarray(s_logits), jnp.asarray(t_logits), temperature=0.0, **kw)


@pytest.mark.parametrize("divergence", [None, ForwardKL()])
def test_the_projected_form_equals_the_logits_form_in_values_and_gradients(divergence):
    """From hidden states and output weights, a few rows of logits at a time: the same values and
    gradients as the full logits (whose values the float64 references above check)."""
    from jkd.losses import projected_cross_tokenizer_divergence

    rng = np.random.default_rng(6)
    b, d_s, d_t, vs, vt = 2, 8, 12, 7, 11
    hs = jnp.asarray(rng.normal(size=(b, 9, d_s)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=(b, 8, d_t)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(vs, d_s)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(vt, d_t)), jnp.float32)
    lay = {k: np.stack([v, v]) for k, v in layout().items()}
    kw = dict(
        student_targets=rng.integers(0, vs, (b, 9)),
        teacher_targets=rng.integers(0, vt, (b, 8)),
        exact=np.stack([EXACT, EXACT]),
        where=np.array([[True] * 5, [True, True, False, True, False]]),
        divergence=divergence,
        shared=(np.array([0, 3, 4, 9], np.int32), np.array([1, 0, 6, 2], np.int32)),
        temperature=1.5,
        **lay,
    )

    def full(hs, ws, ht, wt):
        return cross_tokenizer_divergence(hs @ ws.T, ht @ wt.T, **kw)

    def chunked(hs, ws, ht, wt):
        return projected_cross_tokenizer_divergence(hs, ws, ht, wt, chunk_size=3, **kw)  # 3 divides neither 18 nor 10

    np.testing.assert_allclose(chunked(hs, ws, ht, wt), full(hs, ws, ht, wt), rtol=1e-5, atol=1e-6)
    c = jnp.asarray(rng.normal(size=(b, 5)), jnp.float32)
    g_full = jax.grad(lambda *a: jnp.sum(c * full(*a)), argnums=(0, 1, 2, 3))(hs, ws, ht, wt)
    g_chunk = jax.jit(jax.grad(lambda *a: jnp.sum(c * chunked(*a)), argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
    for a, e in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(g_full[2]).max()) > 0  # the teacher's side has a gradient here (stop it in the step)


@pytest.mark.parametrize("divergence", [None, ForwardKL()])
@pytest.mark.parametrize("k", [7, 11])  # k = V_student, the whole teacher
def test_a_stored_teacher_gives_the_students_gradient_of_the_full_loss(divergence, k):
    """The teacher's top k >= V_student span values, stored: on exact spans (the hybrid) the full
    loss; on ULD spans the full loss less the teacher's mass past its k largest entries, computed
    here in float64 from the reference span distributions; the student's gradients are the full
    loss's."""
    from jkd.losses import projected_cross_tokenizer_divergence, stored_cross_tokenizer_divergence, teacher_span_values

    rng = np.random.default_rng(7)
    b, d_s, d_t, vs, vt = 2, 8, 12, 7, 11
    hs = jnp.asarray(rng.normal(size=(b, 9, d_s)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=(b, 8, d_t)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(vs, d_s)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(vt, d_t)), jnp.float32)
    lay = {key: np.stack([v, v]) for key, v in layout().items()}
    t_tg, s_tg = rng.integers(0, vt, (b, 8)), rng.integers(0, vs, (b, 9))
    shared = (np.array([0, 3, 4, 9], np.int32), np.array([1, 0, 6, 2], np.int32))
    exact = np.stack([EXACT, EXACT])
    where = np.array([[True] * 5, [True, True, False, True, False]])
    kw = dict(exact=exact, where=where, divergence=divergence, temperature=1.5)
    scores = teacher_span_values(
        ht @ wt.T,
        teacher_targets=t_tg,
        teacher_first=lay["teacher_first"],
        teacher_chain=lay["teacher_chain"],
        exact=exact if divergence else None,
        shared_teacher=shared[0],
        temperature=1.5,
    )
    values, ids = jax.lax.top_k(scores, k)
    to_student = np.zeros(vt, np.int32)
    to_student[shared[0]] = shared[1]

    def stored(hs, ws, teacher_ids=ids):
        return stored_cross_tokenizer_divergence(
            hs,
            ws,
            values,
            teacher_ids,
            student_targets=s_tg,
            student_first=lay["student_first"],
            student_chain=lay["student_chain"],
            student_of_teacher=to_student,
            chunk_size=3,
            **kw,
        )

    def full(hs, ws):
        return projected_cross_tokenizer_divergence(
            hs, ws, ht, wt, student_targets=s_tg, teacher_targets=t_tg, shared=shared, chunk_size=3, **lay, **kw
        )

    # the teacher's mass past its k largest span probabilities, float64, from the reference merge
    t_log = (np.asarray(ht, np.float64) @ np.asarray(wt, np.float64).T) / 1.5
    tail = np.zeros((b, 5))
    for r in range(b):
        for s_i, sp in enumerate(T_SPANS):
            row = ref_merged(t_log[r], t_tg[r], [sp], 1.0)[0]
            tail[r, s_i] = np.sort(np.exp(row))[::-1][k:].sum()
    uld_spans = ~exact if divergence is not None else np.ones_like(exact)
    expected = np.asarray(full(hs, ws)) - np.where(uld_spans & where, tail, 0.0)
    np.testing.assert_allclose(stored(hs, ws), expected, rtol=1e-5, atol=1e-6)
    c = jnp.asarray(rng.normal(size=(b, 5)), jnp.float32)
    g_full = jax.grad(lambda *a: jnp.sum(c * full(*a)), argnums=(0, 1))(hs, ws)
    g_stored = jax.jit(jax.grad(lambda *a: jnp.sum(c * stored(*a)), argnums=(0, 1)))(hs, ws)
    for a, e in zip(g_stored, g_full):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
    # ULD reads the sorted values only: stored without ids ([B, S, 0]) it is the same loss
    no_ids = ids[..., :0]
    if divergence is None:
        np.testing.assert_allclose(stored(hs, ws), stored(hs, ws, no_ids), rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="reads the teacher ids of its exact spans"):
            stored(hs, ws, no_ids)
