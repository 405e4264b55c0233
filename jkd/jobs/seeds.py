"""Seeds: each metric as mean and standard deviation over them, and whether one setting beats
another by more than that spread (the verdicts every report gives)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def mean_std(per_seed: Sequence[dict]) -> dict[str, float]:
    """``{key}_mean`` and ``{key}_std`` (population std) for every key that is a number in every
    seed's metrics (a metric that is None or missing for some seed is left out)."""
    out: dict[str, float] = {}
    for key in per_seed[0]:
        values = [m.get(key) for m in per_seed]
        if all(isinstance(v, (int, float)) for v in values):
            out[f"{key}_mean"], out[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    return out


def margin_and_spread(a: dict, b: dict, key: str, *, better: int = 1) -> tuple[float, float] | None:
    """``(margin, spread)`` of entry ``a`` over entry ``b`` on ``key``: the margin is
    ``better * (a mean - b mean)`` (``better=-1`` where lower is better, a loss), the spread the
    larger of the two seed standard deviations. ``a`` beats ``b`` when the margin exceeds the
    spread. None when either lacks the metric."""
    if f"{key}_mean" not in a or f"{key}_mean" not in b:
        return None
    return (better * (a[f"{key}_mean"] - b[f"{key}_mean"]),
            max(a[f"{key}_std"], b[f"{key}_std"]))
