"""The cross-tokenizer loss (ULD and GOLD's hybrid) from hidden states, chunked
(``projected_cross_tokenizer_divergence``), against the same loss on materialised logits
(``h @ W.T`` for both models, then ``cross_tokenizer_divergence``), value and gradient w.r.t. the
student's hidden states and output weight.

Sizes: a Qwen2.5-0.5B-shaped teacher's head (vocabulary 151,936, hidden 896) and a
SmolLM2-135M-shaped student's (49,152, hidden 576), one row of 512 tokens on each side, 400 spans
(a fifth of them two student tokens long, a tenth two teacher tokens long), float32. Memory: XLA's
compiled allocation (temporaries + arguments + outputs) from compiling alone. Time: best of 3, side
by side (the sort of each span's 151,936 probabilities dominates both).

A third form reads the teacher's side stored once (``stored_cross_tokenizer_divergence``: per
span the top ``k`` of ``teacher_span_values``, ``k`` = the student's 49,152 here, which keeps the
student's gradient exact): no teacher projection and no sort of its vocabulary per step; what
storing costs (the teacher's pass, once) is timed apart.

Writes "lm_cross_loss" to runs/bench/results.json: ``peak_ratio`` = chunked peak / full peak (the
weights and gradients, 0.8 GB of arguments and outputs, are in both), ``temp_ratio`` the same for
what the loss itself builds, ``time_ratio`` = chunked time / full time; ``stored_time_ratio`` =
stored time / chunked time.

    .venv/bin/python benchmarks/lm_cross_loss.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from common import peak_bytes, write
from jkd import losses

TEACHER = (151936, 896)
STUDENT = (49152, 576)
TOKENS, SPANS, CHUNK = 512, 400, 64


def _layout(rng):
    """Spans over positions 1..: a fifth two student tokens long, a tenth two teacher tokens long."""
    s_first, t_first = np.zeros(SPANS, np.int32), np.zeros(SPANS, np.int32)
    s_chain, t_chain = np.full(TOKENS, -1, np.int32), np.full(TOKENS, -1, np.int32)
    si = ti = 0
    for k in range(SPANS):
        s_first[k], t_first[k] = si, ti
        s_len, t_len = (2 if k % 5 == 0 else 1), (2 if k % 10 == 3 else 1)
        s_chain[si + 1 : si + s_len], t_chain[ti + 1 : ti + t_len] = k, k
        si, ti = si + s_len, ti + t_len
    assert si < TOKENS and ti < TOKENS
    exact = np.array([k % 5 != 0 and k % 10 != 3 for k in range(SPANS)])
    return {
        "student_first": s_first[None],
        "teacher_first": t_first[None],
        "student_chain": s_chain[None],
        "teacher_chain": t_chain[None],
        "exact": exact[None],
        "student_targets": rng.integers(0, STUDENT[0], (1, TOKENS)),
        "teacher_targets": rng.integers(0, TEACHER[0], (1, TOKENS)),
    }


def run() -> dict:
    rng = np.random.default_rng(0)
    kw = _layout(rng)
    shared = (np.arange(0, 40000, dtype=np.int32), np.arange(0, 40000, dtype=np.int32))
    out = {
        "teacher": TEACHER,
        "student": STUDENT,
        "tokens": TOKENS,
        "spans": SPANS,
        "chunk": CHUNK,
        "device": jax.devices()[0].device_kind,
    }
    k = jax.random.split(jax.random.key(0), 4)
    args = (
        jax.random.normal(k[0], (1, TOKENS, STUDENT[1])),
        jax.random.normal(k[1], STUDENT) / STUDENT[1] ** 0.5,
        jax.random.normal(k[2], (1, TOKENS, TEACHER[1])),
        jax.random.normal(k[3], TEACHER) / TEACHER[1] ** 0.5,
    )
    for name, div in (("uld", None), ("hybrid_fkl", losses.ForwardKL())):
        extra = dict(kw, divergence=div, shared=shared)

        def full(hs, ws, ht, wt, extra=extra):
            return losses.cross_tokenizer_divergence(
                jnp.einsum("btd,vd->btv", hs, ws), jax.lax.stop_gradient(jnp.einsum("btd,vd->btv", ht, wt)), **extra
            ).mean()

        def chunked(hs, ws, ht, wt, extra=extra):
            return losses.projected_cross_tokenizer_divergence(
                hs, ws, jax.lax.stop_gradient(ht), jax.lax.stop_gradient(wt), chunk_size=CHUNK, **extra
            ).mean()

        def scores(ht, wt, extra=extra):  # the teacher's side, what storing computes once
            return losses.teacher_span_values(
                jnp.einsum("btd,vd->btv", ht, wt),
                teacher_targets=extra["teacher_targets"],
                teacher_first=extra["teacher_first"],
                teacher_chain=extra["teacher_chain"],
                exact=extra["exact"] if extra["divergence"] is not None else None,
                shared_teacher=shared[0],
            )

        t0 = time.perf_counter()
        store = jax.jit(lambda ht, wt: jax.lax.top_k(scores(ht, wt), STUDENT[0]))
        values, ids = jax.block_until_ready(store(*args[2:]))
        store_seconds = time.perf_counter() - t0
        values = values.astype(jnp.bfloat16)  # as StoredTopK keeps them
        to_student = np.zeros(TEACHER[0], np.int32)
        to_student[shared[0]] = shared[1]

        def stored(hs, ws, values, ids, extra=extra):
            return losses.stored_cross_tokenizer_divergence(
                hs,
                ws,
                values,
                ids,
                student_targets=extra["student_targets"],
                student_first=extra["student_first"],
                student_chain=extra["student_chain"],
                exact=extra["exact"],
                divergence=extra["divergence"],
                student_of_teacher=to_student,
                chunk_size=CHUNK,
            ).mean()

        fns = {
            n: (jax.jit(jax.value_and_grad(f, argnums=(0, 1))), a)
            for n, f, a in (
                ("full", full, args),
                ("chunked", chunked, args),
                # as the job stores them: ULD keeps the sorted values without their ids
                ("stored", stored, (*args[:2], values, ids if extra["divergence"] is not None else ids[..., :0])),
            )
        }
        row = {"store_once_seconds": store_seconds}
        for n, (f, args_n) in fns.items():
            compiled = f.lower(*args_n).compile()
            row[f"{n}_peak_mib"] = peak_bytes(compiled) / 2**20
            row[f"{n}_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20  # what the loss builds
            jax.block_until_ready(compiled(*args_n))
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                value, _ = jax.block_until_ready(compiled(*args_n))
                best = min(best, time.perf_counter() - t0)
            row[f"{n}_seconds"], row[f"{n}_value"] = best, float(value)
        row["peak_ratio"] = row["chunked_peak_mib"] / row["full_peak_mib"]
        row["temp_ratio"] = row["chunked_temp_mib"] / row["full_temp_mib"]
        row["time_ratio"] = row["chunked_seconds"] / row["full_seconds"]
        row["relative_difference"] = abs(row["chunked_value"] - row["full_value"]) / abs(row["full_value"])
        row["stored_time_ratio"] = row["stored_seconds"] / row["chunked_seconds"]
        out[name] = row
    return out


def report(r: dict) -> str:
    lines = [
        f"lm_cross_loss ({r['device']}; teacher vocab {r['teacher'][0]:,}, student {r['student'][0]:,}, "
        f"{r['tokens']} tokens, {r['spans']} spans, chunk {r['chunk']}):"
    ]
    for name in ("uld", "hybrid_fkl"):
        x = r[name]
        lines.append(
            f"  {name}: peak {x['full_peak_mib']:.0f} -> {x['chunked_peak_mib']:.0f} MiB (x{x['peak_ratio']:.3f}; "
            f"temporaries {x['full_temp_mib']:.0f} -> {x['chunked_temp_mib']:.0f} MiB), "
            f"time {x['full_seconds']:.2f} -> {x['chunked_seconds']:.2f} s (x{x['time_ratio']:.2f}), "
            f"values differ by {x['relative_difference']:.1e}; stored teacher: peak {x['stored_peak_mib']:.0f} MiB, "
            f"{x['stored_seconds']:.2f} s (x{x['stored_time_ratio']:.2f} of chunked), storing once "
            f"{x['store_once_seconds']:.1f} s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    result = run()
    write("lm_cross_loss", result)
    print(report(result))
