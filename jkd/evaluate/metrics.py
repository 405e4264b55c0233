"""Classification metrics as pure numpy functions of predictions and labels.

Inputs are host arrays: ``probs [N, C]`` (rows sum to 1), ``labels [N]`` integers. Each
function follows its textbook definition; the tests compare them with scikit-learn.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


def precision_recall_f1(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall and F1 from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1}


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count 1/2
    (the Mann-Whitney U statistic with average ranks). NaN when a class is absent."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc_ovr(probs: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """One-vs-rest AUC per class and their unweighted mean (``macro``)."""
    labels = np.asarray(labels)
    per_class = np.array([binary_auc(probs[:, k], labels == k) for k in range(probs.shape[1])])
    return {"per_class": per_class, "macro": float(np.nanmean(per_class))}


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    s, pos = np.asarray(scores)[order], np.asarray(positive, bool)[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps, fps = np.cumsum(pos)[distinct], np.cumsum(~pos)[distinct]
    tpr = np.r_[0.0, tps / max(pos.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~pos).sum(), 1)]
    return fpr, tpr


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): ``sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)|`` over equal-width
    confidence bins ``(b/M, (b+1)/M]``."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def classification_report(
    logits: np.ndarray, labels: np.ndarray, num_classes: int, teacher_logits: np.ndarray | None = None
) -> dict[str, object]:
    """Everything ``metrics.json`` records about one model's predictions on one split."""
    probs = softmax(logits)
    labels = np.asarray(labels)
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, num_classes)
    prf = precision_recall_f1(cm)
    auc = roc_auc_ovr(probs, labels)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    out = {
        "accuracy": float((preds == labels).mean()),
        "loss": float(nll.mean()),
        "precision": prf["precision"].tolist(),
        "recall": prf["recall"].tolist(),
        "f1": prf["f1"].tolist(),
        "macro_f1": float(prf["f1"].mean()),
        "auc_ovr": auc["per_class"].tolist(),
        "macro_auc_ovr": auc["macro"],
        "ece": expected_calibration_error(probs, labels),
        "confusion_matrix": cm.tolist(),
    }
    if teacher_logits is not None:
        t_probs = softmax(teacher_logits)
        out["teacher_agreement"] = float((t_probs.argmax(1) == preds).mean())
        kl = np.sum(t_probs * (np.log(np.clip(t_probs, 1e-12, None)) - np.log(np.clip(probs, 1e-12, None))), axis=1)
        out["teacher_kl"] = float(kl.mean())
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the ``T > 0`` minimising the NLL of
    ``softmax(logits / T)`` on held-out data; a log-spaced search then a local refinement."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)

    def nll(t):
        p = softmax(logits / t)
        return -np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-300, None)))

    grid = np.exp(np.linspace(np.log(0.05), np.log(50.0), 200))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = best * np.exp(np.linspace(-0.05, 0.05, 101))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])
