"""What the benchmarks share: timing, XLA's memory figures, and the results file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import jkd

jkd.initialize()  # the settings jkd's commands run with, before JAX starts its CPU backend

import jax  # noqa: E402

RESULTS = Path("runs/bench/results.json")


def seconds_per_call(fn: Callable[[], object], calls: int = 1) -> float:
    """Mean wall seconds of ``fn()`` over ``calls`` calls (``fn`` blocks on its own result)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def peak_bytes(compiled) -> int:
    """A compiled program's peak bytes per device: temporaries + arguments + outputs, from XLA's
    memory analysis (nothing is run)."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def compiled_footprint(compiled, *args, repeats: int = 3) -> dict:
    """Peak bytes (:func:`peak_bytes`), temporary bytes, the best of ``repeats`` timed calls, and
    the first call's output."""
    output = jax.block_until_ready(compiled(*args))
    best = min(seconds_per_call(lambda: jax.block_until_ready(compiled(*args))) for _ in range(repeats))
    return {
        "peak_bytes": peak_bytes(compiled),
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "seconds": best,
        "output": output,
    }


def write(entry: str, result: dict, path: Path = RESULTS) -> None:
    """Merge ``result`` as ``entry`` into the results file (written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[entry] = result
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def forget(entries: str, path: Path = RESULTS) -> None:
    """Remove ``entries`` (a name, or a prefix ending in ``_``) from the results file, before the
    benchmark that writes them runs again: a failed rerun then leaves no old figure behind."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    stale = [
        k for k in data if k == entries or k == entries.rstrip("_") or (entries.endswith("_") and k.startswith(entries))
    ]
    if stale:
        for k in stale:
            del data[k]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
