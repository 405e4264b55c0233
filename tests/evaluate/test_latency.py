"""latency.median_ms: the median of synchronised calls, bounded in time for slow models."""

import time

import pytest

from jkd.evaluate import latency


class _Timed:
    """A callable that sleeps ``seconds[i]`` on its i-th call (call 0 is the warm-up)."""

    def __init__(self, seconds):
        self.seconds, self.calls = list(seconds), 0

    def __call__(self):
        time.sleep(self.seconds[min(self.calls, len(self.seconds) - 1)])
        self.calls += 1
        return 0


def test_the_median_of_the_timed_calls_skips_the_warm_up():
    fn = _Timed([0.3] + [0.01] * 4 + [0.05] * 3)  # a slow first call (compilation) is not timed
    ms = latency.median_ms(fn, repeats=7)
    assert fn.calls == 8 and 9 <= ms < 45  # median of four 10 ms and three 50 ms calls: ~10 ms


def test_a_slow_model_stops_after_the_budget_but_not_before_the_minimum():
    fn = _Timed([0.0] + [0.06] * 30)
    ms = latency.median_ms(fn, repeats=20, budget_s=0.1, min_repeats=5)
    assert fn.calls == 1 + 5 and ms == pytest.approx(60, abs=30)
    fast = _Timed([0.0])
    latency.median_ms(fast, repeats=20, budget_s=0.1)
    assert fast.calls == 21  # a fast model gets every repeat
