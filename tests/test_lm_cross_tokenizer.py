"""`jkd lm distill` across tokenizers: a teacher of one vocabulary, a student folder of its own.

A tiny teacher with jkd's byte tokenizer and a student folder with a BPE learned on the
conversations: the command refuses a token-level loss and names the cross-tokenizer ones; the job
trains the student on the labels, on the teacher's answers as text (sequence-level KD), with the
hybrid on them and with ULD, measures it in its own tokens and saves it with its own tokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jkd import cli
from jkd.data.align import aligned_rows
from jkd.data.chat import render_chat
from jkd.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe_tokenizer
from jkd.models.decoder import Decoder
from jkd.models.decoder_config import DecoderConfig
from jkd.models.hf import load_hf, save_hf
from jkd.runtime.run_folder import slug
from tests.test_lm_experiment import _conversations, _jsonl

pytestmark = pytest.mark.slow


def _folder(path, tok, hidden, seed):
    cfg = DecoderConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=512,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        tie_embeddings=True,
    )
    save_hf(Decoder(cfg, rngs=nnx.Rngs(seed)), path, tokenizer=tok)
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    train = _conversations(24, 0)
    byte = byte_tokenizer()
    own = train_bpe_tokenizer([render_chat(byte, c["messages"]) for c in train], vocab_size=300)
    files = {
        "train": _jsonl(root / "train.jsonl", train),
        "test": _jsonl(root / "test.jsonl", _conversations(6, 1)),
        "unlabelled": _jsonl(root / "u.jsonl", [{"messages": c["messages"][:1]} for c in _conversations(8, 2)]),
    }
    return root, _folder(root / "teacher", byte, 32, 0), _folder(root / "student", own, 16, 1), files


def _argv(pair, *extra):
    root, teacher, student, f = pair
    return [
        "lm",
        "distill",
        "--teacher",
        teacher,
        "--student",
        student,
        "--data",
        f["train"],
        "--test",
        f["test"],
        "--unlabelled",
        f["unlabelled"],
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "160",
        "--max-new-tokens",
        "8",
        "--no-progress",
        *extra,
    ]


def test_a_token_level_loss_across_tokenizers_is_refused_with_the_choices(pair, tmp_path, capsys):
    assert cli.main(_argv(pair, "--run-dir", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert "has its own tokenizer (300 tokens; the teacher's has 259)" in err
    assert "--cross-tokenizer uld" in err and "--cross-tokenizer hybrid" in err
    assert not (tmp_path / "run" / "summary.json").exists()
    # the cross-tokenizer losses run on given text only
    assert (
        cli.main(_argv(pair, "--mode", "on-policy", "--cross-tokenizer", "uld", "--run-dir", str(tmp_path / "r2"))) == 2
    )
    assert "--cross-tokenizer trains on the labelled conversations" in capsys.readouterr().err
    from jkd.cli import build_parser
    from jkd.cli.lm import _lm_config

    args = build_parser().parse_args(
        _argv(
            pair,
            "--mode",
            "stored",
            "--cross-tokenizer",
            "hybrid",
            "--loss",
            "jsd",
            "--ce-weight",
            "1",
            "--run-dir",
            str(tmp_path / "r3"),
        )
    )
    d = _lm_config(args).distillations[0]
    assert d.name == "stored hybrid jsd" and d.objective.stored and d.objective.ce_weight == 1.0
    assert type(d.objective.divergence).__name__ == "GeneralizedJSD" and not d.teacher_answers


def test_the_job_distils_across_tokenizers_and_says_how(pair, tmp_path, capsys):
    from jkd.jobs import lm as LX
    from jkd.losses import ForwardKL
    from jkd.train.lm_cross import CrossTokenizerKD
    from jkd.train.lm_steps import TokenKD

    root, teacher, student, f = pair
    cfg = LX.LMExperimentConfig(
        train_file=f["train"],
        test_file=f["test"],
        unlabelled_file=f["unlabelled"],
        teacher_dir=teacher,
        students=(LX.LMStudent("own", from_dir=student),),
        labelled_subset=None,
        max_length=160,
        max_new_tokens=8,
        batch_size=4,
        student_steps=2,
        seeds=(0, 1),
        title="across tokenizers",
        distillations=(
            LX.LMDistillation("sequence", TokenKD(kd_weight=0.0, ce_weight=1.0), teacher_answers=True),
            LX.LMDistillation(
                "hybrid", CrossTokenizerKD(ForwardKL(), kd_weight=1.0, ce_weight=0.5), teacher_answers=True
            ),
            LX.LMDistillation("uld", CrossTokenizerKD(None, kd_weight=1.0, stored=True)),
        ),
    )
    run_dir = tmp_path / "run"
    summary = LX.run(cfg, run_dir, progress=False)
    out = capsys.readouterr().out
    models = {m["name"]: m for m in summary["models"]}
    assert list(models) == ["teacher", "own alone", "own sequence", "own hybrid", "own uld"]
    assert "8 requests answered" in out
    # the spans of the labelled conversations, as the alignment gives them for the two tokenizers
    byte, own = byte_tokenizer(), Tokenizer.from_folder(student)
    convs = [json.loads(line) for line in Path(f["train"]).read_text().splitlines()]
    ref = aligned_rows(byte, own, convs, max_length=160)
    assert 0 < ref.exact < ref.spans
    assert models["own uld"]["cross_tokenizer"].startswith(
        f"{ref.spans:,} learned spans, ULD on all of them ({100 * ref.exact / ref.spans:.1f}% are one token"
    )
    hybrid = models["own hybrid"]["cross_tokenizer"]
    assert "% exact, one token with the same string in both (ForwardKL on them)" in hybrid and "through ULD" in hybrid
    assert int(hybrid.split(" learned")[0].replace(",", "")) > ref.spans  # the answered requests joined them
    assert models["own hybrid"]["loss"] == "hybrid ForwardKL/ULD + 0.5 CE on teacher answers"
    report = (run_dir / "report.md").read_text()
    assert "own hybrid: " in report and "through ULD" in report
    start = load_hf(student)
    for name in ("own sequence", "own hybrid", "own uld"):
        assert np.isfinite(models[name]["test_cross_entropy_mean"])
        folder = run_dir / slug(name) / "seed1"
        assert Tokenizer.from_folder(folder).vocab_size == 300  # saved with its own tokenizer
        trained = load_hf(folder)
        assert trained.config.vocab_size == 300
        moved = [not np.allclose(a, b) for a, b in zip(jax_leaves(trained), jax_leaves(start))]
        assert any(moved)  # trained from the folder's weights
    losses = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert "own: the teacher's span values stored once (uld): top-259 of" in out  # no teacher in its steps
    assert len(list((run_dir / "teacher_spans").glob("*.npz"))) == 1
    uld = [r for r in losses if r.get("model") == "own uld" and r.get("event") == "train"]
    assert len(uld) == 2 and all(np.isfinite(r["loss"]) and r["spans"] > 0 for r in uld)  # its steps log their spans


def jax_leaves(model):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
