"""Conversation files: bad lines named by line number, the truncation rule, resumable batches."""

import json

import numpy as np
import pytest

from jkd.data import conversations as C
from jkd.data.chat import encode_chat
from jkd.data.tokenizer import byte_tokenizer

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [', r"x.jsonl:2: not valid JSON"),
        ({"text": "hi"}, r"x.jsonl:2: expected an object with a non-empty 'messages' list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"x.jsonl:2: no assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"x.jsonl:2, message 0: role 'robot'"),
        ({"messages": [{"role": "user", "content": 3}, GOOD["messages"][1]]}, r"'content' must be a string"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city: Paris}"}}]},
                ]
            },
            r"x.jsonl:2, message 1, tool call 0 \(f\): arguments are not JSON",
        ),
    ],
)
def test_bad_lines_are_named(tmp_path, bad, message):
    path = _write(tmp_path / "x.jsonl", [GOOD, bad])
    with pytest.raises(C.ConversationError, match=message):
        C.read_conversations(path)


def test_unlabelled_and_empty_files(tmp_path):
    with pytest.raises(C.ConversationError, match="must end before the assistant"):
        C.read_conversations(_write(tmp_path / "u.jsonl", [GOOD]), labelled=False)
    assert (
        len(C.read_conversations(_write(tmp_path / "u.jsonl", [{"messages": GOOD["messages"][:1]}]), labelled=False))
        == 1
    )
    with pytest.raises(C.ConversationError, match="empty"):
        C.read_conversations(_write(tmp_path / "e.jsonl", ["", ""]))
    with pytest.raises(FileNotFoundError, match="no such conversations file"):
        C.read_conversations(tmp_path / "missing.jsonl")
    args = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
        ]
    }  # JSON-string arguments are read once
    got = C.read_conversations(_write(tmp_path / "a.jsonl", [args]))[0]
    assert got["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert got["messages"][0] == args["messages"][0]


def test_truncation_rule_counts():
    tok = byte_tokenizer()
    short = GOOD
    long_user = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "ok"}]}
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * 200}]}
    full = [encode_chat(tok, c["messages"]) for c in (short, long_user, long_answer)]
    enc = C.encode_conversations(tok, [short, long_user, long_answer], max_length=64)
    assert len(full[0].ids) <= 64 < len(full[1].ids)
    assert (enc.truncated, enc.dropped, len(enc)) == (2, 1, 2)  # long_user's answer is past the cut
    np.testing.assert_array_equal(enc.ids[1], full[2].ids[:64])
    np.testing.assert_array_equal(enc.learn[1], full[2].assistant_mask[:64])
    assert enc.learn[1].sum() == 64 - np.argmax(full[2].assistant_mask)


def test_a_long_conversation_keeps_its_system_prompt_and_last_turns():
    tok = byte_tokenizer()
    system = {"role": "system", "content": "You are terse."}
    turn = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    conv = {"messages": [system, *turn("a" * 150, "b" * 150), *turn("c" * 20, "d" * 20), *turn("e", "f")]}
    kept = {"messages": [system, *turn("c" * 20, "d" * 20), *turn("e", "f")]}  # the first exchange dropped
    whole, want = encode_chat(tok, conv["messages"]), encode_chat(tok, kept["messages"])
    assert len(want.ids) <= 160 < len(whole.ids)
    enc = C.encode_conversations(tok, [conv], max_length=160)
    assert (enc.truncated, enc.dropped) == (1, 0)
    np.testing.assert_array_equal(enc.ids[0], want.ids)  # not the first 160 tokens
    np.testing.assert_array_equal(enc.learn[0], want.assistant_mask)


def test_dropped_conversations_say_how_long_max_length_must_be():
    tok = byte_tokenizer()
    big = {"role": "system", "content": "s" * 400}  # a long system prompt: no answer within 128 tokens
    convs = [
        {"messages": [big, {"role": "user", "content": "q" * k}, {"role": "assistant", "content": "ok"}]}
        for k in (5, 30)
    ]
    enc = C.encode_conversations(tok, convs, max_length=128)
    assert (len(enc), enc.dropped, enc.truncated) == (0, 2, 2)
    # the fewest tokens that keep one: the shorter conversation up to its first answer token
    first = [int(np.argmax(encode_chat(tok, c["messages"]).assistant_mask)) + 1 for c in convs]
    assert enc.shortest_dropped == min(first) > 400


def test_a_byte_order_mark_and_errors_at_the_end_of_a_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode())  # as Windows editors save it
    assert C.read_conversations(path) == [GOOD]
    _write(path, [GOOD, '{"messages": [{"role": "user", "content": "hi"}]'])  # the closing brace missing
    with pytest.raises(C.ConversationError, match=r"x?.jsonl:2: not valid JSON \(.* at column 49\)"):
        C.read_conversations(path)
    _write(path, [{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(C.ConversationError, match="not one of system, user, assistant, tool, ipython, function"):
        C.read_conversations(path)
    _write(path, [{"messages": [{"role": "ipython", "content": "{}"}, *GOOD["messages"]]}])
    assert len(C.read_conversations(path)) == 1  # the roles the message names are accepted


def test_turns_and_request_prompts():
    tok = byte_tokenizer()
    conv = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    turns = C.assistant_turns(tok, [conv])
    assert [t.reference["content"] for t in turns] == ["b", "d"]
    assert tok.decode(turns[1].prompt).endswith("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")
    assert turns[1].context == conv["messages"][:3]
    (p,) = C.request_prompts(tok, [{"messages": conv["messages"][:1]}])
    np.testing.assert_array_equal(p, turns[0].prompt)


def test_batches_resume_at_a_position():
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 50, int(n)).astype(np.int32) for n in rng.integers(3, 12, 10)]
    learn = [np.arange(len(i)) >= 2 for i in ids]
    stream = C.sequence_batches(ids, learn, batch_size=4, length=8, pad_id=99, seed=1)
    first = [next(stream) for _ in range(5)]  # 2 batches per epoch: crosses two epochs
    resumed = C.sequence_batches(ids, learn, batch_size=4, length=8, pad_id=99, seed=1, start=3)
    for a, b in zip(first[3:], [next(resumed), next(resumed)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    b = first[0]
    assert np.all(b["tokens"][~b["attention_mask"]] == 99) and not np.any(b["loss_mask"] & ~b["attention_mask"])
    with pytest.raises(ValueError, match="do not fill one batch"):
        next(C.sequence_batches(ids[:3], learn[:3], batch_size=4, length=8, pad_id=0))


def _sequences(n=23, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 50, int(m)).astype(np.int32) for m in rng.integers(2, 17, n)]
    learn = [rng.random(len(i)) < 0.5 for i in ids]
    return ids, learn


def _unpack(batch):
    """The sequences of a packed batch, read back row by row from the segment ids."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            at = np.flatnonzero(seg == s)
            assert np.all(np.diff(at) == 1)  # contiguous
            out.append((tuple(batch["tokens"][r, at]), tuple(batch["loss_mask"][r, at])))
        n = int((seg > 0).sum())
        assert np.all(seg[:n] > 0) and np.all(np.diff(seg[:n]) >= 0)  # sequences in order, padding at the end
    return out


def test_packed_batches_hold_every_sequence_of_an_epoch_once_and_whole():
    ids, learn = _sequences()
    plan = C.pack_plan([len(i) for i in ids], rows=3, length=20, seed=4, epoch=0)
    stream = C.packed_batches(ids, learn, rows=3, length=20, pad_id=0, seed=4)
    seen = []
    for _ in range(len(plan)):
        b = next(stream)
        assert b["tokens"].shape == (3, 20) and b["segment_ids"].dtype == np.int32
        np.testing.assert_array_equal(b["attention_mask"], b["segment_ids"] > 0)
        assert not np.any(b["loss_mask"] & ~b["attention_mask"]) and np.all(b["tokens"][~b["attention_mask"]] == 0)
        seen += _unpack(b)
    expected = sorted((tuple(i), tuple(m)) for i, m in zip(ids, learn))
    assert sorted(seen) == expected
    # denser than one sequence per row: 23 sequences of 2..16 tokens in fewer than 23 rows
    assert len(plan) * 3 < len(ids)


def test_packed_batches_resume_at_a_position_in_a_later_epoch():
    ids, learn = _sequences()
    per_epoch = len(C.pack_plan([len(i) for i in ids], rows=3, length=20, seed=4, epoch=0))
    stream = C.packed_batches(ids, learn, rows=3, length=20, pad_id=0, seed=4)
    first = [next(stream) for _ in range(per_epoch + 3)]
    start = per_epoch + 1
    resumed = C.packed_batches(ids, learn, rows=3, length=20, pad_id=0, seed=4, start=start)
    for a in first[start:]:
        b = next(resumed)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(first[0]["tokens"], first[per_epoch]["tokens"])  # each epoch its own order
    with pytest.raises(ValueError, match="does not fit in a packed row of 10"):
        next(C.packed_batches(ids, learn, rows=3, length=10, pad_id=0))
