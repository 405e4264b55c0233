"""Metrics (pure numpy), plots (matplotlib) and the run report."""

from jkd.evaluate import latency
from jkd.evaluate import metrics
from jkd.evaluate import plots
from jkd.evaluate import predict
from jkd.evaluate import report

__all__ = ["latency", "metrics", "plots", "predict", "report"]
