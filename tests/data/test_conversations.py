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


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [', r"x.jsonl:2: not valid JSON"),
    ({"text": "hi"}, r"x.jsonl:2: expected an object with a non-empty 'messages' list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"x.jsonl:2: no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"x.jsonl:2, message 0: role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}, GOOD["messages"][1]]}, r"'content' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{city: Paris}"}}]}]},
     r"x.jsonl:2, message 1, tool call 0 \(f\): arguments are not JSON"),
])
def test_bad_lines_are_named(tmp_path, bad, message):
    path = _write(tmp_path / "x.jsonl", [GOOD, bad])
    with pytest.raises(C.ConversationError, match=message):
        C.read_conversations(path)


def test_unlabelled_and_empty_files(tmp_path):
    with pytest.raises(C.ConversationError, match="must end before the assistant"):
        C.read_conversations(_write(tmp_path / "u.jsonl", [GOOD]), labelled=False)
    assert len(C.read_conversations(_write(tmp_path / "u.jsonl", [{"messages": GOOD["messages"][:1]}]),
                                    labelled=False)) == 1
    with pytest.raises(C.ConversationError, match="empty"):
        C.read_conversations(_write(tmp_path / "e.jsonl", ["", ""]))
    with pytest.raises(FileNotFoundError, match="no such conversations file"):
        C.read_conversations(tmp_path / "missing.jsonl")
    args = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": 1}'}}]}]}  # JSON-string arguments are fine
    assert C.read_conversations(_write(tmp_path / "a.jsonl", [args]))[0] == args


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


def test_turns_and_request_prompts():
    tok = byte_tokenizer()
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
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
