"""Seeds: each metric as mean and standard deviation over them, and whether one setting beats
another by more than that spread (the verdicts every report gives)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def mean_std(per_seed: Sequence[dict]) -> dict[str, float]:
    """``{key}_mean`` and ``{key}_std`` (population std) for every key that is a number in every
    seed's metrics (a metric that is None or missing for some seed is left out), and
    ``seed_count``: how many seeds the spread is over."""
    out: dict[str, float] = {"seed_count": len(per_seed)}
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
    return (better * (a[f"{key}_mean"] - b[f"{key}_mean"]), max(a[f"{key}_std"], b[f"{key}_std"]))


def verdict(
    a: dict,
    b: dict,
    key: str,
    *,
    label: str,
    other: str | None = None,
    better: int = 1,
    scale: float = 1.0,
    digits: int = 4,
    unit: str = "",
) -> str | None:
    """The report's sentence on whether ``a`` beats ``b`` on ``key`` by more than the seed spread
    (:func:`margin_and_spread`), with both means, the margin and the spread (times ``scale``, to
    ``digits`` decimals, in ``unit``); ``other`` names ``b`` (default its name). None when either
    lacks the metric. With one seed on either side there is no spread to judge by, and the sentence
    says so instead of a verdict. No final full stop: the caller may go on."""
    if (found := margin_and_spread(a, b, key, better=better)) is None:
        return None
    margin, spread = found
    f = lambda x: f"{scale * x:.{digits}f}"  # noqa: E731
    if min(a.get("seed_count", 2), b.get("seed_count", 2)) < 2:
        return (
            f"{a['name']} against {other or b['name']} on {label}: {f(a[f'{key}_mean'])} vs {f(b[f'{key}_mean'])} "
            f"(margin {scale * margin:+.{digits}f}{unit}); one seed, so no seed spread to judge the margin by "
            "(--seeds 0,1,2 gives one)"
        )
    return (
        f"{a['name']} {'beats' if margin > spread else 'does not beat'} {other or b['name']} on {label} by more "
        f"than the seed spread: {f(a[f'{key}_mean'])} vs {f(b[f'{key}_mean'])} (margin {scale * margin:+.{digits}f}"
        f"{unit}, std {f(spread)}{unit})"
    )
