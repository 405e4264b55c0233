"""Latency of a compiled function: the median wall time of repeated, synchronised calls."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def median_ms(fn: Callable, *args, repeats: int = 20) -> float:
    """Median milliseconds of ``fn(*args)`` over ``repeats`` calls, after one warm-up call
    (compilation); each call waits for its result (``jax.block_until_ready``)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
