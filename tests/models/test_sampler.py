"""The sampler: greedy decoding with the cache equals recomputing the whole sequence every step;
sampled tokens follow the filtered distributions; one compilation per length bucket."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jkd.models.decoder import Decoder
from jkd.models.decoder_config import DecoderConfig
from jkd.models import sampler
from jkd.models.sampler import SamplingConfig, filter_logits, generate, sample_logits

CONFIG = DecoderConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    family="qwen3",
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def model():
    m = Decoder(CONFIG, rngs=nnx.Rngs(0))
    # Larger weights than the 0.02 initialisation: peaked, varied next-token distributions.
    nnx.update(m, jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, nnx.state(m)))
    return m


@jax.jit
def _full_forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]


def _greedy_by_full_forward(model, prompt, n, width=32):
    """Recompute the whole sequence (no cache) for every new token; the sequence is padded at
    the end to one width, which causal attention never lets earlier positions see."""
    graphdef, state = nnx.split(model)
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
        seq.append(int(jnp.argmax(_full_forward(graphdef, state, padded)[len(seq) - 1])))
    return seq[len(prompt) :]


def test_greedy_with_cache_equals_argmax_of_the_full_forward(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, n).tolist() for n in (3, 9, 16, 1)]
    out = generate(model, prompts, max_new_tokens=12)
    assert out.lengths.tolist() == [12] * 4
    for prompt, row in zip(prompts, out.rows()):
        assert row.tolist() == _greedy_by_full_forward(model, prompt, 12)
    assert len({tuple(r) for r in out.rows()}) == 4  # the rows really differ


def test_stop_tokens_end_each_row_on_its_own(model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 64, n).tolist() for n in (4, 6)]
    free = generate(model, prompts, max_new_tokens=10)
    stop = int(free.tokens[0, 3])  # row 0 stops at step 3 at the latest
    out = generate(model, prompts, max_new_tokens=10, stop_tokens=[stop], pad_id=63)
    for i, row in enumerate(free.tokens):
        hits = np.flatnonzero(row == stop)
        n = hits[0] + 1 if hits.size else 10
        assert out.lengths[i] == n
        np.testing.assert_array_equal(out.tokens[i, :n], row[:n])
        assert (out.tokens[i, n:] == 63).all()


def test_one_compilation_per_bucket(model):
    rng = np.random.default_rng(2)
    before = sampler.compiled_programs()
    for n in (2, 5, 11, 16):  # all within the 16-token bucket
        generate(model, [rng.integers(0, 64, n).tolist(), [1, 2]], max_new_tokens=4)
    assert sampler.compiled_programs() == before + 1
    generate(model, [rng.integers(0, 64, 17).tolist(), [1, 2]], max_new_tokens=4)  # next bucket
    assert sampler.compiled_programs() == before + 2


def test_same_key_same_tokens_other_key_other_tokens(model):
    prompts = [[1, 2, 3], [4, 5]]
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)
    a = generate(model, prompts, max_new_tokens=16, sampling=cfg, key=7)
    b = generate(model, prompts, max_new_tokens=16, sampling=cfg, key=7)
    c = generate(model, prompts, max_new_tokens=16, sampling=cfg, key=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def _expected(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """The filtered distribution, written independently in float64 from the definitions."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k is not None:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    if top_p is not None:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix whose mass reaches top_p
        nucleus = np.zeros_like(keep)
        nucleus[order[:n]] = True
        p = p * nucleus
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, None, None), (0.5, None, None), (2.0, 3, None), (1.0, None, 0.7), (1.5, 5, 0.8)]
)
def test_sampled_tokens_follow_the_filtered_distribution(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    n = 40_000
    draws = np.asarray(jax.jit(lambda k: sample_logits(jnp.broadcast_to(logits, (n, 8)), k, cfg))(jax.random.key(0)))
    counts = np.bincount(draws, minlength=8)
    p = _expected(logits, temperature, top_k, top_p)
    assert (counts[p == 0] == 0).all(), "a filtered-out token was drawn"
    support = p > 0
    chi2 = stats.chisquare(counts[support], n * p[support])
    assert chi2.pvalue > 1e-4, (counts, n * p)


def test_filter_keeps_the_most_likely_token_even_for_a_tiny_top_p():
    logits = jnp.array([[0.0, 3.0, 1.0]])
    out = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=1e-6))
    assert np.isfinite(np.asarray(out)).tolist() == [[False, True, False]]


def test_bad_requests(model):
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 64\)"):
        generate(model, [[1, 64]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1]], max_new_tokens=250)
    with pytest.raises(ValueError, match="larger than|longer than the largest bucket"):
        generate(model, [list(range(40))], max_new_tokens=2, buckets=(16, 32))
