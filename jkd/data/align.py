"""Two tokenizations of the same text, aligned: the spans where a teacher and a student that do not
share a vocabulary can be compared.

Both tokenizers cut the same characters into tokens; a *span* is the smallest run of one or more
tokens of each whose character ranges coincide (``"Hello"`` may be one teacher token and ``"Hel"``
+ ``"lo"`` for the student: one span). :func:`token_spans` walks the two offset lists and closes a
span wherever both tokenizations end at the same character. Tokens that cover no characters of
their own (a piece of a character that byte-level BPE splits, which ``tokenizers`` maps to the whole
character; a token the post-processor adds) join the span they fall in.

:func:`align_conversation` applies it to a conversation each model renders with its own chat
template: the k-th assistant turn of one rendering is aligned with the k-th of the other, over the
text both turns share from their start (the turn's end marker, ``<|im_end|>`` for one family and
``<|eot_id|>`` for another, and anything after the texts part, forms the turn's last span).
:func:`span_layout` turns the spans into the fixed-shape arrays the cross-tokenizer losses
(:func:`jkd.losses.cross_tokenizer_divergence`) read.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

Span = tuple[int, int, int, int]  # teacher tokens [a0, a1), student tokens [b0, b1): half-open ranges


def token_spans(a_offsets: Sequence[Sequence[int]], b_offsets: Sequence[Sequence[int]]) -> list[Span]:
    """The spans of two tokenizations of one text: ``[(a0, a1, b0, b1)]``, the token ranges of ``a``
    and ``b`` (half-open) that cover the same characters, in order, covering every token of both.

    ``a_offsets`` / ``b_offsets``: ``[(start, end)]`` character offsets per token, in order (as
    ``tokenizers`` gives them). Where the two never meet again (texts that differ from some point
    on), the rest of both forms the last span; a side left with tokens when the other has none
    joins them to the last span. Where both cut the same characters into the same number of tokens
    with the same offsets (the bytes of a character, as byte-level BPE writes it), the spans are
    token for token: a tokenizer aligned with itself gives one-token spans."""
    a_start, a_end = [int(x) for x, _ in a_offsets], [int(e) for _, e in a_offsets]
    b_start, b_end = [int(x) for x, _ in b_offsets], [int(e) for _, e in b_offsets]
    na, nb = len(a_end), len(b_end)
    spans: list[Span] = []
    i = j = 0
    while i < na and j < nb:
        i0, j0 = i, j
        ea, eb = a_end[i], b_end[j]
        i, j = i + 1, j + 1
        while True:
            if ea == eb:  # both end here: a cut, unless a later token still covers characters before it
                while i < na and a_end[i] <= ea:
                    i += 1
                while j < nb and b_end[j] <= eb:
                    j += 1
                if i < na and a_start[i] < ea:
                    ea, i = max(ea, a_end[i]), i + 1
                elif j < nb and b_start[j] < eb:
                    eb, j = max(eb, b_end[j]), j + 1
                else:
                    break
            elif ea < eb and i < na:
                ea, i = max(ea, a_end[i]), i + 1
            elif eb < ea and j < nb:
                eb, j = max(eb, b_end[j]), j + 1
            else:  # one side ran out before the two met: the rest is one span
                i, j = na, nb
                break
        if i - i0 == j - j0 > 1 and [tuple(x) for x in a_offsets[i0:i]] == [tuple(x) for x in b_offsets[j0:j]]:
            spans += [(i0 + k, i0 + k + 1, j0 + k, j0 + k + 1) for k in range(i - i0)]  # token for token
        else:
            spans.append((i0, i, j0, j))
    if (i < na or j < nb) and spans:
        a0, _, b0, _ = spans.pop()
        spans.append((a0, na, b0, nb))
    elif i < na or j < nb:
        spans.append((i, na, j, nb))
    return spans


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The half-open ranges of consecutive True entries."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _common_prefix(x: str, y: str) -> int:
    n = min(len(x), len(y))
    k = 0
    while k < n and x[k] == y[k]:
        k += 1
    return k


def align_turns(
    teacher_text: str,
    teacher_offsets: np.ndarray,
    teacher_mask: np.ndarray,
    student_text: str,
    student_offsets: np.ndarray,
    student_mask: np.ndarray,
) -> list[Span]:
    """The spans of a conversation's assistant turns, rendered once per model.

    ``*_text``: the model's rendering; ``*_offsets [T, 2]``: its tokens' character offsets into it;
    ``*_mask [T]``: its assistant tokens (the ones learned). The k-th run of assistant tokens of one
    is aligned with the k-th of the other (:func:`token_spans`), over the characters both runs
    share from their start; past that point the rest of both runs is one span. Token indices are
    the rows' own. Raises ``ValueError`` when the two renderings have different numbers of
    assistant turns."""
    t_runs, s_runs = _runs(teacher_mask), _runs(student_mask)
    if len(t_runs) != len(s_runs):
        raise ValueError(
            f"the teacher's rendering has {len(t_runs)} assistant turns and the student's "
            f"{len(s_runs)}; the two chat templates must write the same turns"
        )
    spans: list[Span] = []
    for (t0, t1), (s0, s1) in zip(t_runs, s_runs):
        t_start, s_start = int(teacher_offsets[t0][0]), int(student_offsets[s0][0])
        t_text = teacher_text[t_start : int(teacher_offsets[t1 - 1][1])]
        s_text = student_text[s_start : int(student_offsets[s1 - 1][1])]
        shared = _common_prefix(t_text, s_text)
        far = max(len(t_text), len(s_text)) + 1  # past the shared text: every end is the same "far"

        def local(offsets, lo, hi, start, shared=shared, far=far):
            return [(s - start, e - start if e - start <= shared else far) for s, e in offsets[lo:hi]]

        for a0, a1, b0, b1 in token_spans(
            local(teacher_offsets, t0, t1, t_start), local(student_offsets, s0, s1, s_start)
        ):
            spans.append((t0 + a0, t0 + a1, s0 + b0, s0 + b1))
    return spans


@dataclasses.dataclass(frozen=True)
class SpanLayout:
    """One row's spans as fixed-shape arrays (``S`` spans at most, ``Tt`` / ``Ts`` tokens):

    - ``teacher_first`` / ``student_first`` ``[S]`` int32: the position whose logits predict the
      span's first token (the token before it);
    - ``teacher_chain`` ``[Tt]`` / ``student_chain`` ``[Ts]`` int32: for a position whose logits
      predict a later token of a span, that span's index; -1 elsewhere;
    - ``exact`` ``[S]`` bool: one token on each side, the same token string;
    - ``where`` ``[S]`` bool: the spans that exist (and are learned).
    """

    teacher_first: np.ndarray
    student_first: np.ndarray
    teacher_chain: np.ndarray
    student_chain: np.ndarray
    exact: np.ndarray
    where: np.ndarray


def span_layout(
    spans: Sequence[Span],
    *,
    teacher_ids: np.ndarray,
    student_ids: np.ndarray,
    teacher_tokens: Sequence[str | None],
    student_tokens: Sequence[str | None],
    max_spans: int,
    teacher_length: int,
    student_length: int,
) -> SpanLayout:
    """:class:`SpanLayout` of ``spans`` over rows of ``teacher_length`` / ``student_length`` tokens
    (spans reaching past either, or starting at token 0, which nothing predicts, are left out; so
    are those past ``max_spans``). ``*_tokens``: each vocabulary id's token string (for ``exact``)."""
    tf = np.zeros(max_spans, np.int32)
    sf = np.zeros(max_spans, np.int32)
    tc = np.full(teacher_length, -1, np.int32)
    sc = np.full(student_length, -1, np.int32)
    exact = np.zeros(max_spans, bool)
    where = np.zeros(max_spans, bool)
    k = 0
    for a0, a1, b0, b1 in spans:
        if k == max_spans or a0 < 1 or b0 < 1 or a1 > teacher_length or b1 > student_length or a1 <= a0 or b1 <= b0:
            continue
        tf[k], sf[k] = a0 - 1, b0 - 1
        tc[a0 : a1 - 1] = k
        sc[b0 : b1 - 1] = k
        if a1 - a0 == 1 and b1 - b0 == 1:
            t_str, s_str = teacher_tokens[int(teacher_ids[a0])], student_tokens[int(student_ids[b0])]
            exact[k] = t_str is not None and t_str == s_str
        where[k] = True
        k += 1
    return SpanLayout(tf, sf, tc, sc, exact, where)


def id_to_token(vocab: dict[str, int], size: int) -> list[str | None]:
    """``[size]``: each id's token string (None for ids the vocabulary does not name)."""
    out: list[str | None] = [None] * size
    for tok, i in vocab.items():
        if 0 <= i < size:
            out[i] = tok
    return out


def shared_tokens(teacher_vocab: dict[str, int], student_vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The tokens both vocabularies hold (the same string): ``(teacher_ids [M], student_ids [M])``,
    int32, ordered by teacher id."""
    pairs = sorted((i, student_vocab[tok]) for tok, i in teacher_vocab.items() if tok in student_vocab)
    t = np.asarray([p[0] for p in pairs], np.int32)
    s = np.asarray([p[1] for p in pairs], np.int32)
    return t, s


@dataclasses.dataclass
class AlignedRows:
    """Conversations tokenized by both models and aligned (:func:`aligned_rows`): per row, the
    student's ids and learned mask, the teacher's ids, and the spans' :class:`SpanLayout`;
    ``spans`` / ``exact`` count the kept spans and the exact ones, ``cut`` the learned spans left
    out because they reach past either row's length."""

    student_ids: list[np.ndarray]
    student_learn: list[np.ndarray]
    teacher_ids: list[np.ndarray]
    layouts: list[SpanLayout]
    spans: int = 0
    exact: int = 0
    cut: int = 0

    def __len__(self) -> int:
        return len(self.student_ids)

    def cycled(self, n: int) -> "AlignedRows":
        """``n`` rows, these repeated in order (a stand-in of ``n`` rows with these shapes)."""
        pick = [i % len(self) for i in range(n)]
        return AlignedRows(
            *([getattr(self, f)[i] for i in pick] for f in ("student_ids", "student_learn", "teacher_ids", "layouts"))
        )

    @property
    def exact_share(self) -> float:
        """The share of the kept spans that are exact (one token each side, the same string)."""
        return self.exact / self.spans if self.spans else 0.0

    def spans_of(
        self, rows: Sequence[int], *, length: int, teacher_length: int, teacher_pad_id: int
    ) -> dict[str, np.ndarray]:
        """What a cross-tokenizer batch holds beyond the student's rows, for rows ``rows``: the
        teacher's ``teacher_tokens`` and ``teacher_attention_mask`` ``[B, teacher_length]``
        (right-padded with ``teacher_pad_id``) and the spans (``student_first``, ``teacher_first``,
        ``span_exact``, ``span_where`` ``[B, length]``; ``student_chain`` ``[B, length]``,
        ``teacher_chain`` ``[B, teacher_length]``). ``length``: the student's row length."""

        def pad(x, n, value, dtype):
            out = np.full(n, value, dtype)
            out[: len(x)] = x[:n]
            return out

        out: dict[str, list] = {
            k: []
            for k in (
                "teacher_tokens",
                "teacher_attention_mask",
                "student_first",
                "teacher_first",
                "student_chain",
                "teacher_chain",
                "span_exact",
                "span_where",
            )
        }
        for r in rows:
            t, lay = self.teacher_ids[r], self.layouts[r]
            if len(t) > teacher_length or len(lay.student_chain) > length:
                raise ValueError(
                    f"row {r} holds {len(t)} teacher and {len(lay.student_chain)} student tokens; the "
                    f"batch has {teacher_length} and {length}"
                )
            out["teacher_tokens"].append(pad(t, teacher_length, teacher_pad_id, np.int32))
            out["teacher_attention_mask"].append(pad(np.ones(len(t), bool), teacher_length, False, bool))
            out["student_first"].append(pad(lay.student_first, length, 0, np.int32))
            out["teacher_first"].append(pad(lay.teacher_first, length, 0, np.int32))
            out["student_chain"].append(pad(lay.student_chain, length, -1, np.int32))
            out["teacher_chain"].append(pad(lay.teacher_chain, teacher_length, -1, np.int32))
            out["span_exact"].append(pad(lay.exact, length, False, bool))
            out["span_where"].append(pad(lay.where, length, False, bool))
        return {k: np.stack(v) for k, v in out.items()}

    def batch(
        self, rows: Sequence[int], *, length: int, teacher_length: int, pad_id: int, teacher_pad_id: int
    ) -> dict[str, np.ndarray]:
        """Rows ``rows`` as one right-padded batch: the student's ``tokens``, ``loss_mask`` and
        ``attention_mask`` ``[B, length]`` (:func:`jkd.data.conversations.padded_rows`) with
        :meth:`spans_of`."""
        from jkd.data.conversations import padded_rows

        rows = list(rows)
        student = padded_rows(
            [self.student_ids[r] for r in rows], [self.student_learn[r] for r in rows], length=length, pad_id=pad_id
        )
        return {
            **student,
            **self.spans_of(rows, length=length, teacher_length=teacher_length, teacher_pad_id=teacher_pad_id),
        }


def with_spans(
    batches: Iterator[dict], aligned: AlignedRows, *, teacher_length: int, teacher_pad_id: int
) -> Iterator[dict]:
    """Each batch of the student's rows of ``aligned`` (as :func:`jkd.data.conversations.sequence_batches`
    gives them, with their ``index``) with the teacher's rows and the spans attached
    (:meth:`AlignedRows.spans_of`)."""
    for b in batches:
        yield {
            **b,
            **aligned.spans_of(
                b["index"], length=b["tokens"].shape[1], teacher_length=teacher_length, teacher_pad_id=teacher_pad_id
            ),
        }


def aligned_rows(
    teacher,
    student,
    conversations: Sequence[dict],
    *,
    max_length: int,
    teacher_max_length: int | None = None,
    teacher_conversations: Sequence[dict] | None = None,
) -> AlignedRows:
    """Each conversation rendered and tokenized by each model (its own chat template), its assistant
    turns aligned (:func:`align_turns`), the rows cut at ``max_length`` student tokens and
    ``teacher_max_length`` teacher tokens (default: the same); conversations left with no learned
    span are left out. ``teacher`` / ``student``: :class:`jkd.data.tokenizer.Tokenizer`;
    ``teacher_conversations``: the same conversations as the teacher's template takes them, where
    the two tool-call formats write arguments differently (default: ``conversations``)."""
    if teacher_conversations is not None and len(teacher_conversations) != len(conversations):
        raise ValueError(
            f"teacher_conversations has {len(teacher_conversations)} conversations and conversations "
            f"{len(conversations)}; give the same conversations for both"
        )
    from jkd.data.chat import encode_chat

    t_max = teacher_max_length or max_length
    t_str = id_to_token(teacher.backend.get_vocab(with_added_tokens=True), teacher.vocab_size)
    s_str = id_to_token(student.backend.get_vocab(with_added_tokens=True), student.vocab_size)
    out = AlignedRows([], [], [], [])
    for conv, t_conv in zip(conversations, teacher_conversations or conversations):
        t_enc = encode_chat(teacher, t_conv["messages"], tools=t_conv.get("tools"))
        s_enc = encode_chat(student, conv["messages"], tools=conv.get("tools"))
        _, t_off = teacher.encode_with_offsets(t_enc.text)
        _, s_off = student.encode_with_offsets(s_enc.text)
        spans = align_turns(t_enc.text, t_off, t_enc.assistant_mask, s_enc.text, s_off, s_enc.assistant_mask)
        t_len, s_len = min(len(t_enc.ids), t_max), min(len(s_enc.ids), max_length)
        lay = span_layout(
            spans,
            teacher_ids=t_enc.ids,
            student_ids=s_enc.ids,
            teacher_tokens=t_str,
            student_tokens=s_str,
            max_spans=s_len,
            teacher_length=t_len,
            student_length=s_len,
        )
        out.cut += sum(1 for a0, a1, b0, b1 in spans if a1 > t_len or b1 > s_len)
        if not lay.where.any():
            continue
        out.student_ids.append(s_enc.ids[:s_len])
        out.student_learn.append(s_enc.assistant_mask[:s_len])
        out.teacher_ids.append(t_enc.ids[:t_len])
        out.layouts.append(lay)
        out.spans += int(lay.where.sum())
        out.exact += int((lay.exact & lay.where).sum())
    return out
