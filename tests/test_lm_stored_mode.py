"""`jkd lm distill --mode stored`: the teacher's top-k stored once in the run folder (the values a
float64 reference computes), no teacher forward per step, reused on --resume, and the same
students on a (2, 2) mesh as on one device."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jkd import cli
from tests.test_lm_experiment import _conversations, _jsonl


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random tiny teacher folder (jkd's byte tokenizer) and a user's conversations."""
    from flax import nnx

    from jkd.data.tokenizer import byte_tokenizer
    from jkd.models.decoder import Decoder
    from jkd.models.decoder_config import DecoderConfig
    from jkd.models.hf import save_hf

    root = tmp_path_factory.mktemp("stored")
    tok = byte_tokenizer()
    config = DecoderConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    teacher = Decoder(config, rngs=nnx.Rngs(3))
    save_hf(teacher, root / "teacher", tokenizer=tok)
    files = {
        "train": _jsonl(root / "train.jsonl", _conversations(16, 0)),
        "test": _jsonl(root / "test.jsonl", _conversations(3, 1)),
    }
    return root, files


def distill_argv(root, files, run_dir, *flags):
    """`jkd lm distill` of the fixture's pair at tiny sizes, with ``flags``."""
    return [
        "lm",
        "distill",
        "--teacher",
        str(root / "teacher"),
        "--data",
        files["train"],
        "--test",
        files["test"],
        "--batch-size",
        "4",
        "--max-length",
        "160",
        "--max-new-tokens",
        "4",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        *flags,
    ]


def _argv(root, files, run_dir, *extra):
    return distill_argv(
        root,
        files,
        run_dir,
        "--mode",
        "stored",
        "--top-k",
        "8",
        "--ce-weight",
        "0.2",
        "--student",
        "16x1",
        "--steps",
        "3",
        "--seeds",
        "0,1",
        "--no-baseline",
        "--set",
        "student_optimizer.eps=1e-4",
        *extra,
    )


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_stored_mode_stores_once_resumes_and_runs_on_a_mesh(pair, capsys):
    root, files = pair
    one = root / "one"
    assert cli.main(_argv(root, files, one)) == 0
    out = capsys.readouterr().out
    assert "teacher outputs stored once: top-8 of 16 conversations x 159 positions" in out
    summary = json.loads((one / "summary.json").read_text())
    assert summary["models"][1]["loss"] == "stored top-8 ForwardKL + 0.2 CE"
    assert summary["models"][1]["teacher_signal"] is True

    # What was stored, against float64 log-probabilities of the teacher's logits for conversation 0.
    from jkd.data import conversations as C
    from jkd.data.tokenizer import Tokenizer
    from jkd.models.hf import load_hf
    from jkd.train.stored import StoredTopK

    stored = StoredTopK.load(one / "teacher_topk" / "top8_vocab259.npz")
    assert stored.values.shape == (16, 159, 8) and stored.key == "tokens"
    tok = Tokenizer.from_folder(root / "teacher")
    ids = C.encode_conversations(tok, C.read_conversations(files["train"]), max_length=160).ids
    teacher = load_hf(root / "teacher")
    # the stored rows are the labelled conversations in the job's order: conversation 0's row is the
    # one whose fingerprint is that of its tokens
    from jkd.train.stored import fingerprints

    tokens = np.full((len(ids), 160), tok.pad_id, np.int32)
    mask = np.zeros((len(ids), 160), bool)
    for r, x in enumerate(ids):
        tokens[r, : len(x)], mask[r, : len(x)] = x, True
    row = int(np.flatnonzero(stored.fingerprints == fingerprints(tokens[:1], mask[:1])[0])[0])
    n = len(ids[0])
    logits = np.asarray(teacher(tokens[:1, :n]), np.float64)[0, :-1]
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    want_ids = np.argsort(-log_p, axis=-1, kind="stable")[:, :8]
    np.testing.assert_array_equal(stored.indices[row, : n - 1], want_ids)
    np.testing.assert_allclose(
        stored.values[row, : n - 1].astype(np.float64), np.take_along_axis(log_p, want_ids, -1), rtol=2**-7, atol=1e-6
    )  # bf16

    assert cli.main(_argv(root, files, one, "--resume")) == 0  # reused: neither stored nor trained again
    out = capsys.readouterr().out
    assert "stored once" not in out and "resumed from the checkpoint of step 3" in out

    mesh = root / "mesh"
    assert cli.main(_argv(root, files, mesh, "--mesh", "data=2,model=2")) == 0
    for seed in (0, 1):
        a = _weights(one / "student_16x1_stored_fkl" / f"seed{seed}")
        b = _weights(mesh / "student_16x1_stored_fkl" / f"seed{seed}")
        assert max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a) < 1e-5


def test_stored_mode_refuses_what_it_cannot_do(pair, tmp_path, capsys):
    root, files = pair
    for extra, message in (
        (["--loss", "jsd"], "--mode stored trains the forward KL"),
        (["--pack-length", "320"], "do not combine with packed rows"),
    ):
        assert cli.main(_argv(root, files, tmp_path / "x", *extra)) == 2
        assert message in capsys.readouterr().err


def _student_folder(path, *, vocab, seed=5):
    from flax import nnx

    from jkd.data.tokenizer import byte_tokenizer
    from jkd.models.decoder import Decoder
    from jkd.models.decoder_config import DecoderConfig
    from jkd.models.hf import save_hf

    tok = byte_tokenizer()
    ends = dict(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id) if vocab > tok.pad_id else {}
    config = DecoderConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=512,
        **ends,
    )
    save_hf(Decoder(config, rngs=nnx.Rngs(seed)), path)
    return path


def _short(root, files, run_dir, student, *extra):
    return distill_argv(root, files, run_dir, "--student", student, "--steps", "2", "--seeds", "0", *extra)


@pytest.mark.slow
def test_students_cut_from_the_teacher_or_loaded_from_a_folder(pair, tmp_path, capsys):
    root, files = pair
    # layers=0: the teacher's block 0, its embeddings and head; the student alone: random, same shape
    assert cli.main(_short(root, files, tmp_path / "cut", "layers=0")) == 0
    models = {m["name"]: m for m in json.loads((tmp_path / "cut" / "summary.json").read_text())["models"]}
    cut = models["student layers 0 token fkl"]
    assert cut["initialisation"] == "teacher layers" and models["student layers 0 alone"]["initialisation"] == "random"
    assert cut["params"] == models["teacher"]["params"]  # the one-block teacher, whole

    # a folder: its weights are the start of every setting (a learning rate of 1e-12 leaves them)
    folder = _student_folder(tmp_path / "small", vocab=259)
    assert cli.main(_short(root, files, tmp_path / "folder", str(folder), "--lr", "1e-12")) == 0
    start = _weights(folder)
    for group in ("student_small_alone", "student_small_token_fkl"):
        end = _weights(tmp_path / "folder" / group / "seed0")
        assert max(float(np.abs(start[k].astype(np.float64) - end[k]).max()) for k in start) < 1e-6
    models = json.loads((tmp_path / "folder" / "summary.json").read_text())["models"]
    assert {m["initialisation"] for m in models[1:]} == {"student folder"}

    # a vocabulary smaller than the tokenizer's is refused, never changed
    small = _student_folder(tmp_path / "tiny_vocab", vocab=200)
    assert cli.main(_short(root, files, tmp_path / "bad", str(small))) == 2
    assert "has 200 vocabulary rows but the tokenizer has 259 tokens" in capsys.readouterr().err
    assert cli.main(_short(root, files, tmp_path / "bad2", "layers=zero")) == 2
    assert "--student layers=... takes the teacher's block numbers" in capsys.readouterr().err

    # narrower: half the MLP channels, one of the two key/value groups (by activation importance)
    assert cli.main(_short(root, files, tmp_path / "narrow", "layers=0", "--prune-width", "mlp=32,kv_heads=1")) == 0
    assert "MLP 64 -> 32 channels, key/value heads 2 -> 1 (query heads 4 -> 2)" in capsys.readouterr().out
    saved = json.loads(
        (tmp_path / "narrow" / "student_layers_0_mlp_32_kv_1_token_fkl" / "seed0" / "config.json").read_text()
    )
    assert (saved["intermediate_size"], saved["num_key_value_heads"], saved["num_attention_heads"]) == (32, 1, 2)
    models = {m["name"]: m for m in json.loads((tmp_path / "narrow" / "summary.json").read_text())["models"]}
    assert models["student layers 0 mlp 32 kv 1 token fkl"]["initialisation"] == "teacher layers, pruned"
    assert (
        models["student layers 0 mlp 32 kv 1 alone"]["params"]
        == models["student layers 0 mlp 32 kv 1 token fkl"]["params"]
        < cut["params"]
    )
    assert cli.main(_short(root, files, tmp_path / "bad3", "16x1", "--prune-width", "mlp=8")) == 2
    assert "--prune-width narrows a student cut from the teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_micro_batches_and_remat_through_the_cli(pair, tmp_path, capsys):
    root, files = pair
    base = [
        "--mode",
        "token",
        "--kd-weight",
        "0.8",
        "--ce-weight",
        "0.2",
        "--set",
        "student_optimizer.eps=1e-4",
        "--no-baseline",
        "--batch-size",
        "4",
    ]
    assert cli.main(_short(root, files, tmp_path / "plain", "16x1", *base)) == 0
    assert cli.main(_short(root, files, tmp_path / "lean", "16x1", *base, "--micro-batches", "2", "--remat")) == 0
    config = json.loads((tmp_path / "lean" / "config.json").read_text())
    assert config["micro_batches"] == 2 and config["remat"] is True
    a = _weights(tmp_path / "plain" / "student_16x1_token_fkl" / "seed0")
    b = _weights(tmp_path / "lean" / "student_16x1_token_fkl" / "seed0")
    assert max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a) < 1e-6
    assert cli.main(_short(root, files, tmp_path / "bad", "16x1", *base, "--micro-batches", "3")) == 2
    assert "must be a whole number >= 1 that divides batch_size (4); got 3" in capsys.readouterr().err
