"""`jkd lm distill --tools`: a user's tools module in the job (sequence mode)."""

import json

import pytest

from jkd import cli
from tests.scripted import scripted_generate
from tests.test_lm_experiment import _conversations, _jsonl, _save_teacher

pytestmark = pytest.mark.slow

USER_TOOLS = """
import time


def double(x: int) -> dict:
    \"\"\"Double x.

    Args:
        x: n
    \"\"\"
    return {"y": 2 * x}


def boom(x: int) -> dict:
    \"\"\"Fails.

    Args:
        x: n
    \"\"\"
    raise RuntimeError("down")


def nap(x: int) -> dict:
    \"\"\"Sleeps.

    Args:
        x: n
    \"\"\"
    time.sleep(60)
"""


def test_sequence_mode_runs_the_users_tools(tmp_path, capsys, monkeypatch):
    """`--tools`: the module's tools are offered to conversations naming none, the teacher's calls
    run through them (a raising and a sleeping tool reported) and the run completes. The teacher's
    sampled text is stood in for (a random tiny teacher never calls a tool); the rest is the job's."""
    import jkd.jobs.lm as LX
    from jkd.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    _save_teacher(tmp_path / "teacher", seed=0, positions=1024)
    tok.save(tmp_path / "teacher")
    tools = tmp_path / "tools.py"
    tools.write_text(USER_TOOLS)
    train = _jsonl(tmp_path / "train.jsonl", _conversations(8, 0))
    own = [{"type": "function", "function": {"name": "t", "description": "t", "parameters": {"type": "object"}}}]
    test = _jsonl(tmp_path / "test.jsonl", [{**c, "tools": own} for c in _conversations(2, 1)])  # short prompts
    unl = _jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(4)])
    calls = ["double", "boom", "nap", None]
    seen = {}

    def answers(teacher, prompts, *, cache_dir, **kw):
        seen[cache_dir.name] = [tok.decode(p) for p in prompts]
        if cache_dir.name == "answers":
            return [
                tok.encode(
                    (
                        "<tool_call>\n" + json.dumps({"name": c, "arguments": {"x": 3}}) + "\n</tool_call>"
                        if c
                        else "no call"
                    )
                    + "<|im_end|>"
                )
                for c in calls
            ]
        return [tok.encode("ok<|im_end|>") for _ in prompts]

    monkeypatch.setattr(LX, "teacher_answers", answers)
    argv = [
        "lm",
        "distill",
        "--teacher",
        str(tmp_path / "teacher"),
        "--data",
        train,
        "--test",
        test,
        "--unlabelled",
        unl,
        "--mode",
        "sequence",
        "--tools",
        str(tools),
        "--tool-timeout",
        "1",
        "--student",
        "16x1",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--max-length",
        "960",
        "--max-new-tokens",
        "4",
        "--seeds",
        "0",
        "--no-baseline",
        "--run-dir",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"tools: double, boom, nap from {tools} (stopped after 1 s)" in out
    assert (
        "4 requests answered, 3 of them carried on after the tools' results" in out
        and "of 3 tool calls, 1 raised, 1 stopped after 1 s, each answered by the teacher from the error" in out
    )
    assert all('"name": "double"' in p for p in seen["answers"])  # the tools offered in every prompt
    after = seen["answers_after_tools"]
    assert '{"y": 6}' in after[0] and "error: RuntimeError: down" in after[1] and "was stopped" in after[2]
    # the tools module joins the guard: another module is another run
    tools.write_text(USER_TOOLS.replace("2 * x", "3 * x"))
    assert cli.main([*argv, "--resume"]) == 2
    assert "tools_file (--tools): its contents changed" in capsys.readouterr().err


def test_a_llama_format_teacher_runs_the_users_tools(tmp_path, capsys, monkeypatch):
    """A Llama-3.1-style folder (its template writes calls as JSON with `parameters`, results as the
    `ipython` role; `<|eom_id|>` a special token): the format is read off its template, the teacher's
    calls in that format run through the user's tools, and their results go back in its layout."""
    import transformers
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    import jkd.jobs.lm as LX
    from jkd.data.tokenizer import Tokenizer
    from tests.agents.test_formats import CORPUS, LLAMA31, SPECIALS

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = Tokenizer(backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA31)
    folder = tmp_path / "teacher"
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=[tok.eos_id, tok.token_to_id("<|eom_id|>")],
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(folder)
    tools = tmp_path / "tools.py"
    tools.write_text(USER_TOOLS)
    train = _jsonl(tmp_path / "train.jsonl", _conversations(8, 0))
    test = _jsonl(tmp_path / "test.jsonl", _conversations(2, 1))
    unl = _jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": f"double {i}"}]} for i in range(4)])
    seen = {}

    def answers(teacher, prompts, *, cache_dir, **kw):
        seen[cache_dir.name] = [tok.decode(p) for p in prompts]
        if cache_dir.name == "answers":
            return [tok.encode('{"name": "double", "parameters": {"x": 3}}<|eom_id|>')] * 3 + [
                tok.encode("hi<|eot_id|>")
            ]
        return [tok.encode("It is 6.<|eot_id|>") for _ in prompts]

    monkeypatch.setattr(LX, "teacher_answers", answers)
    assert (
        cli.main(
            [
                "lm",
                "distill",
                "--teacher",
                str(folder),
                "--data",
                train,
                "--test",
                test,
                "--unlabelled",
                unl,
                "--mode",
                "sequence",
                "--tools",
                str(tools),
                "--student",
                "16x1",
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--max-length",
                "160",
                "--max-new-tokens",
                "4",
                "--seeds",
                "0",
                "--no-baseline",
                "--run-dir",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tool calls read in the llama3_json format (read off the chat template)" in out
    assert "4 requests answered, 3 of them carried on after the tools' results" in out
    after = seen["answers_after_tools"]
    assert all('"parameters": {"x": 3}' in p and "ipython<|end_header_id|>" in p and '{"y": 6}' in p for p in after)


def test_on_policy_plays_the_students_calls_through_the_users_tools(tmp_path, capsys, monkeypatch):
    """`--mode on-policy --tools`: the student's own calls run through the user's module (a working,
    a raising and a sleeping tool); each result (or error) is read back into its trajectory, which it
    trains on, and the run completes and reports them. The student's sampler is stood in for (a random
    tiny student never writes a call); its calls are read, run and rendered by the job."""
    import jkd.jobs.lm as LX
    from jkd.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    _save_teacher(tmp_path / "teacher", seed=0, positions=2048)
    tok.save(tmp_path / "teacher")
    tools = tmp_path / "tools.py"
    tools.write_text(USER_TOOLS)
    train = _jsonl(tmp_path / "train.jsonl", _conversations(8, 0))
    own = [{"type": "function", "function": {"name": "t", "description": "t", "parameters": {"type": "object"}}}]
    test = _jsonl(tmp_path / "test.jsonl", [{**c, "tools": own} for c in _conversations(2, 1)])  # short prompts
    names = ["double", "boom", "nap", "none"]
    unl = _jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": f"use {n}"}]} for n in names])
    played = []

    def reply(text):
        played.append(text)
        name = next(n for n in names if f"use {n}" in text)
        if "<|im_start|>tool" in text or name == "none":
            return "answered<|im_end|>"
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": {"x": 3}}) + "\n</tool_call><|im_end|>"

    batches = []
    real = LX.LMJob._rollout_batch

    def recording(self, *a, **kw):
        batches.append(batch := real(self, *a, **kw))
        return batch

    monkeypatch.setattr(LX, "generate", scripted_generate(reply, tok))
    monkeypatch.setattr(LX.LMJob, "_rollout_batch", recording)
    argv = [
        "lm",
        "distill",
        "--teacher",
        str(tmp_path / "teacher"),
        "--data",
        train,
        "--test",
        test,
        "--unlabelled",
        unl,
        "--mode",
        "on-policy",
        "--lambda",
        "1",
        "--tools",
        str(tools),
        "--tool-timeout",
        "1",
        "--student",
        "16x1",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--max-length",
        "960",
        "--max-new-tokens",
        "4",
        "--seeds",
        "0",
        "--no-baseline",
        "--run-dir",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "1 steps played 4 trajectories through the tools, 3 of them calling tools; of 3 tool calls, 1 raised, "
        "1 stopped after 1 s, each answered by the student from the error"
    ) in out
    after = [t for t in played if "<|im_start|>tool" in t]
    assert len(after) == 3 and all('"name": "double"' in t for t in played)  # the module's tools offered
    assert any('{"y": 6}' in t for t in after) and any("error: RuntimeError: down" in t for t in after)
    assert any("did not answer within 1 s and was stopped" in t for t in after)
    (batch,) = batches
    learned = [tok.decode(batch["tokens"][r, 0][batch["loss_mask"][r, 0]]) for r in range(4)]
    whole = [tok.decode(batch["tokens"][r, 0][batch["attention_mask"][r, 0]]) for r in range(4)]
    assert sum("error: RuntimeError: down" in w for w in whole) == 1  # the error read back, never learned
    assert not any("error" in x or '"y"' in x for x in learned)
    assert sum(x.endswith("answered<|im_end|>") for x in learned) == 4
