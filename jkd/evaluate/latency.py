"""Latency of a compiled function: the median wall time of repeated, synchronised calls."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def median_ms(fn: Callable, *args, repeats: int = 20, budget_s: float = 2.0, min_repeats: int = 5) -> float:
    """Median milliseconds of ``fn(*args)`` over ``repeats`` calls, after one warm-up call
    (compilation); each call waits for its result (``jax.block_until_ready``). A slow model stops
    early, after at least ``min_repeats`` calls, once ``budget_s`` seconds of calls are spent."""
    jax.block_until_ready(fn(*args))
    times = []
    while len(times) < repeats and (len(times) < min_repeats or sum(times) < budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
