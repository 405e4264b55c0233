"""Spans of two tokenizations of the same text: checked against a brute-force statement of what a
span is (the cuts where both tokenizations end at the same character), on hand-worked offsets and on
real BPE tokenizers over text with non-ASCII characters, whitespace runs and special tokens."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from jkd.data.align import align_turns, id_to_token, shared_tokens, span_layout, token_spans
from jkd.data.chat import encode_chat
from jkd.data.tokenizer import Tokenizer, byte_tokenizer

CORPUS = [
    "Hello world, the weather in Zürich is 5 °C and snowy.",
    "naïve café — déjà vu",
    "tabs\t\tand  spaces   here",
    "<|im_start|>user\nhello<|im_end|>\n",
] * 20
TEXT = "Hello  wörld,\tthe café in Zürich — 5 °C.<|im_end|>\n"


def bpe(vocab_size: int, corpus=CORPUS) -> Tokenizer:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return Tokenizer(backend, eos_token="<|im_end|>", chat_template=byte_tokenizer().chat_template)


def clean_cuts(offsets) -> set[int]:
    """The character positions where a tokenization can be cut: after token k, when no token up to k
    ends past it and no later token starts before it."""
    ends = [e for _, e in offsets]
    return {
        ends[k]
        for k in range(len(offsets))
        if max(ends[: k + 1]) == ends[k] and all(s >= ends[k] for s, _ in offsets[k + 1 :])
    }


def brute_force(a, b) -> list[tuple[int, int]]:
    """The spans' character ranges: consecutive cuts common to both (their last token's end ends the text)."""
    cuts = sorted(clean_cuts(a) & clean_cuts(b))
    return list(zip([0] + cuts[:-1], cuts))


def char_ranges(spans, a, b):
    out = []
    for a0, a1, b0, b1 in spans:
        ra = (min(s for s, _ in a[a0:a1]), max(e for _, e in a[a0:a1]))
        rb = (min(s for s, _ in b[b0:b1]), max(e for _, e in b[b0:b1]))
        assert ra == rb, (ra, rb)
        if not out or out[-1] != ra:  # the bytes of one character, token for token on both sides
            out.append(ra)
    return out


def test_hand_worked_spans():
    a = [(0, 3), (3, 5), (5, 11)]  # "Hel" "lo" " world"
    b = [(0, 5), (5, 9), (9, 11)]  # "Hello" " wor" "ld"
    assert token_spans(a, b) == [(0, 2, 0, 1), (2, 3, 1, 3)]
    # a character split in two byte-level tokens (both map to it) stays whole; a zero-width token joins
    a = [(0, 1), (1, 2), (1, 2), (2, 2), (2, 3)]
    b = [(0, 2), (2, 3)]
    assert token_spans(a, b) == [(0, 4, 0, 1), (4, 5, 1, 2)]
    # texts that part ways: the rest is one span; a side left over joins the last span
    assert token_spans([(0, 1), (1, 9)], [(0, 1), (1, 5), (5, 7)]) == [(0, 1, 0, 1), (1, 2, 1, 3)]
    assert token_spans([(0, 1), (1, 2)], [(0, 1)]) == [(0, 2, 0, 1)]
    assert token_spans([], [(0, 1)]) == [(0, 0, 0, 1)]


@pytest.mark.parametrize("sizes", [(300, 600), (600, None), (None, 400)])
@pytest.mark.parametrize("text", [TEXT, "Zürich: 5", "déjà  vu\t\t— naïve<|im_start|>"])
def test_spans_are_the_common_cuts_of_real_tokenizers(sizes, text):
    """(600 and 300 cut "Zürich" as "ZÃ" "¼rich" and "ZÃ" "¼" "rich": a token that straddles a cut.)"""
    ta, tb = (bpe(n) if n else byte_tokenizer() for n in sizes)
    _, a = ta.encode_with_offsets(text)
    _, b = tb.encode_with_offsets(text)
    a, b = a.tolist(), b.tolist()
    spans = token_spans(a, b)
    assert [s[0] for s in spans] == [0] + [s[1] for s in spans[:-1]] and spans[-1][1] == len(a)  # a partition
    assert [s[2] for s in spans] == [0] + [s[3] for s in spans[:-1]] and spans[-1][3] == len(b)
    assert char_ranges(spans, a, b) == brute_force(a, b)  # the smallest spans that coincide


def test_a_tokenizer_aligned_with_itself_gives_one_token_spans():
    t = bpe(300)
    _, a = t.encode_with_offsets(TEXT)
    spans = token_spans(a.tolist(), a.tolist())
    assert all(a1 - a0 == 1 and b1 - b0 == 1 for a0, a1, b0, b1 in spans) and len(spans) == len(a)


def test_turns_align_on_what_they_share_and_the_rest_is_the_last_span():
    teacher, student = bpe(600), bpe(300)
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Zürich: 5 °C,  snowy."},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "De rien — café?"},
    ]
    t_enc, s_enc = encode_chat(teacher, msgs), encode_chat(student, msgs)
    _, t_off = teacher.encode_with_offsets(t_enc.text)
    _, s_off = student.encode_with_offsets(s_enc.text)
    spans = align_turns(t_enc.text, t_off, t_enc.assistant_mask, s_enc.text, s_off, s_enc.assistant_mask)
    t_learn, s_learn = np.flatnonzero(t_enc.assistant_mask), np.flatnonzero(s_enc.assistant_mask)
    assert sorted(i for a0, a1, _, _ in spans for i in range(a0, a1)) == t_learn.tolist()  # every learned token once
    assert sorted(i for _, _, b0, b1 in spans for i in range(b0, b1)) == s_learn.tolist()
    for a0, a1, b0, b1 in spans:  # the same text on both sides
        assert t_enc.text[t_off[a0][0] : t_off[a1 - 1][1]] == s_enc.text[s_off[b0][0] : s_off[b1 - 1][1]]
    # a teacher whose template ends turns with another marker: the marker is the turn's last span
    other = bpe(600)
    other.chat_template = other.chat_template.replace("<|im_end|>", "<|im_start|>")
    o_enc = encode_chat(other, msgs)
    _, o_off = other.encode_with_offsets(o_enc.text)
    spans = align_turns(o_enc.text, o_off, o_enc.assistant_mask, s_enc.text, s_off, s_enc.assistant_mask)
    last_of_turn = [sp for sp in spans if o_enc.text[o_off[sp[1] - 1][0] : o_off[sp[1] - 1][1]] == "<|im_start|>"]
    assert len(last_of_turn) == 2
    assert all(s_enc.text[s_off[b1 - 1][0] : s_off[b1 - 1][1]] == "<|im_end|>" for _, _, _, b1 in last_of_turn)
    with pytest.raises(ValueError, match="teacher's rendering has 2 assistant turns and the student's 1"):
        one = encode_chat(student, msgs[:2])
        align_turns(t_enc.text, t_off, t_enc.assistant_mask, one.text, s_off[: len(one.ids)], one.assistant_mask)


def test_span_layout_and_shared_tokens():
    teacher, student = bpe(600), bpe(300)
    t_vocab = teacher.backend.get_vocab(with_added_tokens=True)
    s_vocab = student.backend.get_vocab(with_added_tokens=True)
    t_ids, s_ids = shared_tokens(t_vocab, s_vocab)
    assert len(t_ids) == len(set(t_vocab) & set(s_vocab))
    t_str, s_str = id_to_token(t_vocab, teacher.vocab_size), id_to_token(s_vocab, student.vocab_size)
    assert all(t_str[i] == s_str[j] for i, j in zip(t_ids, s_ids))
    ids_t, off_t = teacher.encode_with_offsets(TEXT)
    ids_s, off_s = student.encode_with_offsets(TEXT)
    spans = token_spans(off_t.tolist(), off_s.tolist())
    lay = span_layout(
        spans,
        teacher_ids=ids_t,
        student_ids=ids_s,
        teacher_tokens=t_str,
        student_tokens=s_str,
        max_spans=len(spans) + 3,
        teacher_length=len(ids_t),
        student_length=len(ids_s),
    )
    kept = [sp for sp in spans if sp[0] >= 1 and sp[2] >= 1]  # a span at token 0 has no predicting position
    assert lay.where.sum() == len(kept) and not lay.where[len(kept) :].any()
    for k, (a0, a1, b0, b1) in enumerate(kept):
        assert lay.teacher_first[k] == a0 - 1 and lay.student_first[k] == b0 - 1
        assert (lay.teacher_chain[a0 : a1 - 1] == k).all() and (lay.student_chain[b0 : b1 - 1] == k).all()
        assert lay.exact[k] == (a1 - a0 == 1 and b1 - b0 == 1 and t_str[ids_t[a0]] == s_str[ids_s[b0]])
    assert (lay.teacher_chain >= 0).sum() == sum(a1 - a0 - 1 for a0, a1, _, _ in kept)
    assert lay.exact.any() and (lay.where & ~lay.exact).any()  # both kinds on this text
