"""Peak host memory while loading a Hugging Face folder: jkd's ``load_hf`` (tensor by tensor)
against reading the whole safetensors file first (``safetensors.numpy.load_file``, then placing
each array), side by side, each in a fresh process.

The folder is a random Llama of about 136M parameters (545 MB of float32), written by jkd's
``save_hf``. Each child process starts JAX, notes its resident memory, loads, and reports its peak
resident memory (``VmHWM``) above that baseline. The target (the issue's): jkd's peak stays
below the model's size plus 1.5 times its largest tensor, i.e. no second full copy on the host.
Then the real SmolLM2-135M-Instruct folder (tests/real_model.py), jkd only: its peak against the
model's size (target: at most 5% above).

Writes "lm_loading" to runs/bench/results.json.

    .venv/bin/python benchmarks/lm_loading.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import write

CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_layers=6,
    num_heads=16,
    num_kv_heads=8,
    family="llama",
)

_CHILD = """
import json, resource, sys
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()  # start the backend before the baseline
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
def high_water():  # VmHWM: this process image's peak (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
way, folder = sys.argv[1], sys.argv[2]
base = rss()
if way == "jkd":
    from jkd.models.hf import load_hf
    model = load_hf(folder)
    leaves = jax.tree.leaves(__import__("flax").nnx.state(model))
else:
    from safetensors.numpy import load_file
    arrays = load_file(folder + "/model.safetensors")
    leaves = [jax.device_put(a) for a in arrays.values()]
    del arrays
jax.block_until_ready(leaves)
peak = high_water()
print(json.dumps({"baseline": base, "peak": peak, "after": rss(),
                  "loaded_bytes": sum(x.nbytes for x in leaves)}))
"""


def _child(way: str, folder: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, way, folder], capture_output=True, text=True, cwd=root, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> dict:
    import jax.numpy as jnp
    from flax import nnx

    from jkd.models.decoder import Decoder
    from jkd.models.decoder_config import DecoderConfig
    from jkd.models.hf import save_hf

    cfg = DecoderConfig(**CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        model = Decoder(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
        sizes = [v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(model))]
        folder = str(save_hf(model, Path(tmp) / "llama"))
        del model
        model_bytes, largest = sum(sizes), max(sizes)
        results = {way: _child(way, folder) for way in ("jkd", "whole_file")}
    bound = model_bytes + 1.5 * largest
    mb = 1e6
    out = {
        "parameters": cfg.num_parameters(),
        "model_mb": model_bytes / mb,
        "largest_tensor_mb": largest / mb,
        "bound_mb": bound / mb,
        "target": "jkd peak above baseline < model + 1.5 x largest tensor",
    }
    for way, r in results.items():
        out[f"{way}_peak_mb"] = (r["peak"] - r["baseline"]) / mb
        out[f"{way}_loaded_mb"] = r["loaded_bytes"] / mb
    out["jkd_within_bound"] = bool(out["jkd_peak_mb"] < out["bound_mb"])
    out["ratio"] = out["whole_file_peak_mb"] / out["jkd_peak_mb"]
    out["smollm2"] = _real()
    return out


def _real() -> dict:
    """The real SmolLM2-135M-Instruct folder (float32, tied embeddings): jkd's peak against the
    model's size (target: within 5% above it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.real_model import smollm2_folder

    from jkd.models.hf import checkpoint_tensors

    folder = smollm2_folder()
    model_bytes = sum(t.nbytes for t in checkpoint_tensors(folder).values())
    r = _child("jkd", str(folder))
    peak = r["peak"] - r["baseline"]
    return {
        "model_mb": model_bytes / 1e6,
        "jkd_peak_mb": peak / 1e6,
        "peak_over_model": peak / model_bytes,
        "target": 1.05,
    }


def report(r: dict) -> str:
    return (
        f"lm_loading ({r['parameters'] / 1e6:.0f}M params, {r['model_mb']:.0f} MB, largest tensor "
        f"{r['largest_tensor_mb']:.0f} MB): peak above baseline jkd {r['jkd_peak_mb']:.0f} MB vs whole file "
        f"{r['whole_file_peak_mb']:.0f} MB; bound {r['bound_mb']:.0f} MB "
        f"({'met' if r['jkd_within_bound'] else 'NOT met'}); SmolLM2-135M-Instruct ({r['smollm2']['model_mb']:.0f} "
        f"MB): peak {r['smollm2']['jkd_peak_mb']:.0f} MB = {r['smollm2']['peak_over_model']:.3f}x the model "
        f"(target <= {r['smollm2']['target']})"
    )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    r = run()
    write("lm_loading", r)
    print(report(r))
