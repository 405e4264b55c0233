"""PNG figures of a run (matplotlib ``Figure`` objects saved directly: no display, no pyplot,
and no process-wide backend choice, so importing jkd leaves a notebook's matplotlib alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from jkd.evaluate.metrics import roc_curve, softmax


def _subplots(*args, **kwargs):
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


def curves(histories: dict[str, list[dict]], path: Path, *, held_out: str = "test", x: str = "epoch") -> None:
    """Train and held-out loss and accuracy per epoch of every model on one figure.

    ``histories[name]`` holds records with ``x`` (``epoch`` or ``step``) and any of ``train_loss``,
    ``train_accuracy``, ``held_out_loss``, ``held_out_accuracy``; ``held_out`` names the split
    those were measured on ("validation" or "test"). Panels with no data are left out.
    """
    panels = [
        ("train_loss", "train loss"),
        ("held_out_loss", f"{held_out} loss"),
        ("train_accuracy", "train accuracy"),
        ("held_out_accuracy", f"{held_out} accuracy"),
    ]
    panels = [p for p in panels if any(p[0] in r for recs in histories.values() for r in recs)] or panels[:1]
    rows = 2 if len(panels) > 2 else 1
    cols = 2 if len(panels) > 1 else 1
    fig, axes = _subplots(rows, cols, figsize=(5.5 * cols + 0.5, 3.5 * rows + 0.5), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes.ravel(), panels):
        for name, recs in histories.items():
            pts = [(r[x], r[key]) for r in recs if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name, marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(x)
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def loss_panels(panels: dict[str, dict[str, list[tuple[float, float]]]], path: Path, *, x: str = "step") -> None:
    """One panel per kind of loss (``panels[title][model] = [(x, loss), ...]``): losses of different
    kinds (a cross-entropy, a KL divergence) are never drawn on one axis."""
    panels = {t: series for t, series in panels.items() if any(series.values())} or {"train loss": {}}
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = _subplots(rows, cols, figsize=(5.0 * cols + 0.5, 3.3 * rows + 0.5), squeeze=False)
    for ax, (title, series) in zip(axes.ravel(), panels.items()):
        for name, pts in series.items():
            if pts:
                ax.plot(*zip(*pts), label=name, marker="." if len(pts) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def confusion(cm: np.ndarray, path: Path, title: str) -> None:
    cm = np.asarray(cm)
    fig, ax = _subplots(figsize=(5.5, 5))
    ax.imshow(cm, cmap="Blues")
    if cm.shape[0] <= 20:
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def roc(logits: np.ndarray, labels: np.ndarray, path: Path, title: str) -> None:
    probs = softmax(logits)
    fig, ax = _subplots(figsize=(5.5, 5))
    for k in range(probs.shape[1]):
        fpr, tpr = roc_curve(probs[:, k], np.asarray(labels) == k)
        ax.plot(fpr, tpr, lw=1, label=str(k) if probs.shape[1] <= 10 else None)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if probs.shape[1] <= 10:
        ax.legend(fontsize=7, title="class (one vs rest)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def accuracy_vs_size(
    entries: list[dict], path: Path, *, key: str = "test_accuracy", label: str = "test accuracy (%)"
) -> None:
    """Bars of a mean metric in [0, 1] (+- std over seeds, in %) per model, annotated with parameters."""
    names = [e["name"] for e in entries]
    means = [100 * e[f"{key}_mean"] for e in entries]
    stds = [100 * e[f"{key}_std"] for e in entries]
    fig, ax = _subplots(figsize=(max(6, 1.3 * len(entries)), 4.5))
    bars = ax.bar(
        range(len(entries)),
        means,
        yerr=stds,
        capsize=4,
        color=[
            "#555" if e["role"] == "teacher" else "#999" if e["role"] == "student_alone" else "#3a7" for e in entries
        ],
    )
    for b, e, sd in zip(bars, entries, stds):
        ax.text(
            b.get_x() + b.get_width() / 2,
            b.get_height() + sd + 0.05,
            f"{e['params'] / 1e6:.2f}M",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(range(len(entries)), names, rotation=20, ha="right", fontsize=8)
    lo = min(means) - 3 * max(max(stds), 0.5)
    ax.set_ylim(max(0.0, lo), min(100.0, max(means) + 3))
    ax.set_ylabel(label)
    ax.set_title(f"{label.split(' (')[0]} vs model size (parameters above the bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def heatmap(
    values: np.ndarray, rows: list[str], cols: list[str], path: Path, *, title: str, row_label: str, col_label: str
) -> None:
    """A grid of values (e.g. test accuracy in %) with each cell annotated."""
    values = np.asarray(values, np.float64)
    fig, ax = _subplots(figsize=(1.2 * len(cols) + 2.5, 0.8 * len(rows) + 2))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < values.mean() else "black")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
