"""The language-model job end to end on tiny models: `jkd lm demo` and `jkd lm distill`."""

import json
import math

import numpy as np
import pytest

from jkd import cli
from jkd.runtime.run_folder import slug

pytestmark = pytest.mark.slow

TINY = [
    "--no-progress",
    "--set",
    "data_sizes=(('train', 96), ('validation', 4), ('test', 12), ('unlabelled', 32))",
    "--set",
    "vocab_size=512",
    "--set",
    "teacher_steps=3",
    "--set",
    "student_steps=2",
    "--set",
    "labelled_subset=16",
    "--set",
    "batch_size=8",
    "--set",
    "seeds=(0, 1)",
    "--set",
    "max_new_tokens=8",
]
TINY += [
    "--set",
    "teacher.hidden_size=32",
    "--set",
    "teacher.head_dim=8",
    "--set",
    "teacher.intermediate_size=64",
    "--set",
    "teacher.num_layers=2",
    "--set",
    "students[0].teacher_layers=(0, 1)",
    "--set",
    "students[1].teacher_layers=(1,)",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lm") / "demo"
    assert cli.main(["lm", "demo", "--run-dir", str(run_dir), *TINY]) == 0
    return run_dir


def test_demo_writes_the_whole_run_folder(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    roles = [m["role"] for m in summary["models"]]
    assert roles == ["teacher"] + (["student_alone"] + ["distilled"] * 5) * 2
    for m in summary["models"][1:]:
        assert m["seeds"] == 2 and len(m["per_seed"]) == 2
        assert m["per_seed"][0]["tasks"] == 12 and 0 <= m["task_success_mean"] <= 1 and 0 <= m["pass^3_mean"] <= 1
        assert 0 <= m["tool_call_exact_match_mean"] <= 1 and math.isfinite(m["test_cross_entropy_mean"])
        assert "agreement_with_teacher_mean" in m and m["generation_tokens_per_s_mean"] > 0
        assert m["size_bytes"] == (demo_dir / slug(m["name"]) / "seed0" / "model.safetensors").stat().st_size
    for name in (
        "config.json",
        "log.jsonl",
        "report.md",
        "samples.md",
        "curves.png",
        "exact_match_vs_size.png",
        "teacher/model/config.json",
        "teacher/model/tokenizer.json",
        "tokenizer/tokenizer.json",
        "data/train.jsonl",
        "data/unlabelled.jsonl",
        "student_2_layers_alone/seed1/model.safetensors",
        "student_1_layer_on_policy_jsd/seed0/config.json",
    ):
        assert (demo_dir / name).exists(), name
    assert list((demo_dir / "answers").glob("answers-*/batch-*.npz"))  # the teacher's cached answers
    report = (demo_dir / "report.md").read_text()
    assert "| student 1 layer sequence KD | distilled |" in report and "by more than the seed spread" in report
    assert "Task success: 12 test conversations played in the loop" in report and "| task success |" in report
    assert "tool calls read in the hermes format (read off the chat template)" in report
    assert list((demo_dir / "tb").iterdir())


def test_cross_entropy_matches_transformers(demo_dir):
    """The report's test cross-entropy of the teacher, recomputed by transformers' Llama."""
    import torch
    import transformers

    from jkd.data import conversations as C
    from jkd.data.tokenizer import Tokenizer

    summary = json.loads((demo_dir / "summary.json").read_text())
    reported = summary["models"][0]["test_cross_entropy_mean"]
    tok = Tokenizer.from_folder(demo_dir / "tokenizer")
    enc = C.encode_conversations(tok, C.read_conversations(demo_dir / "data" / "test.jsonl"), max_length=128)
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_dir / "teacher" / "model", dtype=torch.float64)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, learn in zip(enc.ids, enc.learn):
            logits = model(torch.tensor(ids[None].astype(np.int64))).logits[0, :-1]
            nll = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:, None].astype(np.int64)))[:, 0]
            total += float(nll[torch.tensor(learn[1:])].sum())
            count += int(learn[1:].sum())
    assert reported == pytest.approx(total / count, rel=1e-4)


def test_rerun_resumes_and_a_changed_config_is_refused(demo_dir, capsys):
    assert cli.main(["lm", "demo", "--run-dir", str(demo_dir), *TINY]) == 0
    out = capsys.readouterr().out
    assert "teacher: loaded from" in out  # saved once, not retrained
    assert "student 2 layers alone: resumed from the checkpoint of step 2" in out  # the final one, not step 0
    assert cli.main(["lm", "demo", "--run-dir", str(demo_dir), *TINY, "--set", "student_steps=3"]) == 2
    assert "student_steps (--student-steps): 2 -> 3" in capsys.readouterr().err


def _conversations(n, seed):
    """Short tool-use conversations of a user's own: "double N" calls a tool, "hi" needs none."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 9))
        if rng.random() < 0.7:
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": f"double {k}"},
                        {
                            "role": "assistant",
                            "content": "",
                            "tool_calls": [
                                {"type": "function", "function": {"name": "double", "arguments": json.dumps({"x": k})}}
                            ],
                        },
                        {"role": "tool", "content": json.dumps({"y": 2 * k})},
                        {"role": "assistant", "content": f"It is {2 * k}."},
                    ]
                }
            )
        else:
            out.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]})
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _save_teacher(folder, *, seed, positions=512):
    """A random tiny Llama of 512 positions, as `transformers` writes it, for jkd's byte tokenizer."""
    import torch
    import transformers

    from jkd.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def user_pair(tmp_path_factory):
    """A teacher folder as `transformers` writes it (random tiny Llama) with jkd's byte tokenizer."""
    from jkd.data.tokenizer import byte_tokenizer

    root = tmp_path_factory.mktemp("user")
    _save_teacher(root / "teacher", seed=0)
    byte_tokenizer().save(root / "teacher")
    files = {
        "train": _jsonl(root / "train.jsonl", _conversations(24, 0)),
        "test": _jsonl(root / "test.jsonl", _conversations(6, 1)),
        "unlabelled": _jsonl(root / "u.jsonl", [{"messages": c["messages"][:1]} for c in _conversations(8, 2)]),
    }
    return root, files


def test_distill_a_users_pair(user_pair, capsys):
    root, f = user_pair
    run_dir = root / "run"
    argv = [
        "lm",
        "distill",
        "--teacher",
        str(root / "teacher"),
        "--data",
        f["train"],
        "--test",
        f["test"],
        "--unlabelled",
        f["unlabelled"],
        "--mode",
        "sequence",
        "--loss",
        "rkl",
        "--kd-weight",
        "0.5",
        "--ce-weight",
        "0.5",
        "--student",
        "16x1",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "160",
        "--pack-length",
        "320",
        "--max-new-tokens",
        "8",
        "--seeds",
        "0,1",
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "teacher: loaded from" in out and "8 requests answered" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["teacher", "student 16x1 alone", "student 16x1 sequence rkl"]
    assert summary["models"][2]["loss"] == "0.5 ReverseKL + 0.5 CE on teacher answers"
    assert summary["models"][0]["loss"] == "(loaded, not trained here)"  # was "cross-entropy (all labelled)"
    assert summary["counts"]["test_turns"] == sum(
        1 for c in _conversations(6, 1) for m in c["messages"] if m["role"] == "assistant"
    )
    from jkd.models.hf import load_hf

    student = load_hf(run_dir / "student_16x1_sequence_rkl" / "seed1")
    assert student.config.hidden_size == 16 and student.config.vocab_size == 259
    from pathlib import Path

    # Another test file (its contents changed at the same path) only changes what is measured: the
    # trained students are reused, not retrained, and measured on the new conversations.
    test = Path(f["test"])
    original_test = test.read_text()
    test.write_text(original_test + json.dumps(_conversations(1, 9)[0]) + "\n")
    assert cli.main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "evaluation settings changed (file_digests.test_file:" in out and "are reused and measured again" in out
    assert "student 16x1 sequence rkl: resumed from the checkpoint of step 2" in out  # not trained again
    again = json.loads((run_dir / "summary.json").read_text())
    added = sum(1 for m in _conversations(1, 9)[0]["messages"] if m["role"] == "assistant")
    assert again["counts"]["test_turns"] == summary["counts"]["test_turns"] + added
    test.write_text(original_test)
    # What the students learned from is guarded: the training data, a training flag, the teacher.
    train = Path(f["train"])
    original_train = train.read_text()
    train.write_text(original_train + json.dumps(_conversations(1, 9)[0]) + "\n")
    assert cli.main([*argv, "--resume"]) == 2
    assert "train_file (--data): its contents changed" in capsys.readouterr().err
    train.write_text(original_train)
    assert cli.main([*argv[: argv.index("--steps") + 1], "3", *argv[argv.index("--steps") + 2 :], "--resume"]) == 2
    assert "student_steps (--steps): 2 -> 3" in capsys.readouterr().err
    weights = root / "teacher" / "model.safetensors"
    original_weights = weights.read_bytes()
    _save_teacher(root / "teacher", seed=1)  # the teacher retrained in place: same shapes and size, other values
    assert weights.stat().st_size == len(original_weights) and weights.read_bytes() != original_weights
    assert cli.main([*argv, "--resume"]) == 2
    assert "teacher_dir (--teacher): its contents changed" in capsys.readouterr().err
    weights.write_bytes(original_weights)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: rows[:3] + ["{not json"], "train.jsonl:4: not valid JSON"),
        (
            lambda rows: rows[:2] + [json.dumps({"messages": [{"role": "user", "content": "x"}]})],
            "train.jsonl:3: no assistant turn",
        ),
    ],
)
def test_distill_refuses_bad_files_before_writing(user_pair, tmp_path, capsys, mutate, message):
    root, f = user_pair
    rows = mutate([json.dumps(c) for c in _conversations(5, 3)])
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    code = cli.main(
        [
            "lm",
            "distill",
            "--teacher",
            str(root / "teacher"),
            "--data",
            str(bad),
            "--test",
            f["test"],
            "--run-dir",
            str(run_dir),
            "--no-progress",
        ]
    )
    assert code == 2 and message in capsys.readouterr().err
    assert not run_dir.exists()  # nothing written half-way


def test_what_would_stop_a_run_after_training_is_refused_before_it(user_pair, tmp_path, capsys):
    """Test prompts longer than --max-length once crashed the evaluation after training (and the fixed
    command was then refused); conversations cut to nothing said "0 sequences do not fill one batch"."""
    root, f = user_pair
    long_system = {"role": "system", "content": "You are a careful assistant. " * 20}  # ~580 bytes
    long_test = _jsonl(
        tmp_path / "long_test.jsonl", [{"messages": [long_system, *c["messages"]]} for c in _conversations(4, 5)]
    )
    run_dir = tmp_path / "run"
    base = [
        "lm",
        "distill",
        "--teacher",
        str(root / "teacher"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "160",
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]
    assert cli.main([*base, "--data", f["train"], "--test", long_test]) == 2
    err = capsys.readouterr().err
    assert "no test turn to measure" in err and "longer than --max-length 160 (the shortest has" in err
    assert not (run_dir / ".started").exists()  # nothing trained: the corrected command is not refused
    long_train = _jsonl(
        tmp_path / "long_train.jsonl", [{"messages": [long_system, *c["messages"]]} for c in _conversations(8, 6)]
    )
    assert cli.main([*base, "--data", long_train, "--test", f["test"]]) == 2
    err = capsys.readouterr().err
    from jkd.data.chat import encode_chat
    from jkd.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    need = min(
        int(np.argmax(encode_chat(tok, [long_system, *c["messages"]]).assistant_mask)) + 1 for c in _conversations(8, 6)
    )
    assert (
        f"8 of the 8 conversations for the students ({long_train}) have no assistant token within --max-length 160"
    ) in err
    assert f"the shortest of them needs {need} tokens" in err and f"raise --max-length to at least {need}" in err
    assert cli.main([*base, "--data", f["train"], "--test", f["test"], "--max-length", "600"]) == 2
    err = capsys.readouterr().err
    assert "--max-length 600 exceeds the teacher's max_position_embeddings (512" in err
    assert not (run_dir / ".started").exists()
    assert cli.main([*base, "--data", f["train"], "--test", f["test"], "--teacher", "Qwen/Qwen2.5-0.5B-Instruct"]) == 2
    err = capsys.readouterr().err
    assert "no such folder. jkd reads local Hugging Face folders" in err and "huggingface-cli download" in err


def test_distill_flags_are_checked(user_pair, capsys):
    root, f = user_pair
    base = ["lm", "distill", "--data", f["train"], "--test", f["test"], "--run-dir", str(root / "x"), "--no-progress"]
    assert cli.main([*base, "--mode", "on-policy"]) == 2
    assert "--mode on-policy needs --unlabelled" in capsys.readouterr().err
    assert cli.main([*base, "--student", "wide"]) == 2
    assert "--student must be WIDTHxLAYERS" in capsys.readouterr().err
    assert cli.main([*base, "--max-length", "160", "--pack-length", "100"]) == 2
    assert "pack_length (100) must hold a whole conversation of max_length (160) tokens" in capsys.readouterr().err
    assert not (root / "x").exists()  # refused before the run folder is written


def test_evaluate_and_generate_a_saved_student(demo_dir, tmp_path, capsys):
    """`jkd lm evaluate` on a saved student reproduces the run's own figures for that seed."""
    summary = json.loads((demo_dir / "summary.json").read_text())
    seed0 = next(m for m in summary["models"] if m["name"] == "student 1 layer sequence KD")["per_seed"][0]
    out = tmp_path / "m.json"
    assert (
        cli.main(
            [
                "lm",
                "evaluate",
                str(demo_dir / "student_1_layer_sequence_kd" / "seed0"),
                "--test",
                str(demo_dir / "data" / "test.jsonl"),
                "--max-length",
                "128",
                "--max-new-tokens",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    got = json.loads(out.read_text())
    for key in (
        "tool_call_exact_match",
        "tool_name_accuracy",
        "no_tool_accuracy",
        "turns",
        "tool_call_parse_rate",
        "tool_call_attempts",
    ):
        assert got[key] == seed0[key], key
    assert got["tool_format"] == "hermes" and got["tool_format_chosen"] == "read off the chat template"
    assert "task_success" in seed0 and 0 <= seed0["task_success"] <= 1  # the run played the tasks too
    assert got["test_cross_entropy"] == pytest.approx(seed0["test_cross_entropy"], rel=1e-5)
    capsys.readouterr()
    assert (
        cli.main(
            [
                "lm",
                "generate",
                str(demo_dir / "teacher" / "model"),
                "--prompt",
                "weather in Oslo tomorrow",
                "--prompt",
                "hi",
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "> weather in Oslo tomorrow\n" in text and "> hi\n" in text
    assert cli.main(["lm", "evaluate", str(tmp_path), "--test", str(demo_dir / "data" / "test.jsonl")]) == 2


def test_export_a_student_as_stablehlo(demo_dir, tmp_path):
    """The exported forward pass equals the student's logits, at two batch sizes and lengths."""
    import jax
    import jax.numpy as jnp

    from jkd.data.tokenizer import Tokenizer
    from jkd.models.hf import load_hf

    folder = demo_dir / "student_2_layers_token_kd_fkl" / "seed0"
    out = tmp_path / "export"
    assert cli.main(["lm", "export", str(folder), "--out", str(out)]) == 0
    exported = jax.export.deserialize((out / "model.stablehlo").read_bytes())
    model, tok = load_hf(folder), Tokenizer.from_folder(out)
    rng = np.random.default_rng(0)
    for b, t in ((1, 7), (3, 20)):
        tokens = rng.integers(0, tok.vocab_size, (b, t)).astype(np.int32)
        mask = np.ones((b, t), bool)
        mask[-1, t // 2 :] = False  # a right-padded row
        got = np.asarray(exported.call(jnp.asarray(tokens), jnp.asarray(mask)))
        want = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
        np.testing.assert_allclose(got[mask], want[mask], atol=1e-5)
    assert json.loads((out / "serving.json").read_text())["output"].startswith("float32 logits")
    assert cli.main(["lm", "export", str(folder), "--out", str(out)]) == 2  # not over an existing export


def test_a_killed_demo_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL during the teacher's training; the rerun continues from the checkpoint it finds."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    argv = [a for a in TINY if a != "--no-progress"]
    # The teacher alone: the kill and the resume are the teacher's; the students' groups are tested above.
    argv = [
        *argv,
        "--set",
        "teacher_steps=400",
        "--set",
        "distillations=()",
        "--set",
        "include_baseline=False",
        "--set",
        "pass_k=0",
    ]
    cmd = [sys.executable, "-m", "jkd.cli", "lm", "demo", "--run-dir", str(run_dir), "--no-progress", *argv]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ckpt = run_dir / "teacher" / "ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.isdigit() and int(p.name) >= 100 for p in ckpt.glob("*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    # A second run on the folder while the first trains: refused, naming the process that holds it
    # (two runs once interleaved their logs and deleted each other's checkpoints).
    import socket

    from jkd.runtime.run_lock import RunFolderBusy

    from jkd.jobs import lm as LX

    with pytest.raises(RunFolderBusy, match=f"in use by process {proc.pid} on host {socket.gethostname()}"):
        LX.run(LX.demo_config(), run_dir, resume=True)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (run_dir / "teacher" / "model").exists()  # killed before the teacher was saved
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = [ln for ln in second.stdout.splitlines() if ln.startswith("teacher: resumed from the checkpoint of step")]
    assert resumed and 100 <= int(resumed[0].rsplit(" ", 1)[1]) < 400, second.stdout  # neither 0 nor the end
    assert f"taking over the lock left by process {proc.pid}" in second.stdout  # the killed run's, recognised
    assert json.loads((run_dir / "summary.json").read_text())["models"][0]["role"] == "teacher"
