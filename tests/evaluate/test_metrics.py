"""Metrics against scikit-learn (an independent implementation)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from jkd.evaluate import metrics as M


def _data(n=300, c=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.standard_normal((n, c)) + 2.0 * np.eye(c)[labels] * rng.random((n, 1))
    return logits, labels


def test_confusion_and_prf_match_sklearn():
    logits, y = _data()
    pred = logits.argmax(1)
    cm = M.confusion_matrix(y, pred, 5)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=range(5)))
    prf = M.precision_recall_f1(cm)
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=range(5), zero_division=0)
    np.testing.assert_allclose(prf["precision"], p)
    np.testing.assert_allclose(prf["recall"], r)
    np.testing.assert_allclose(prf["f1"], f)
    np.testing.assert_allclose(prf["f1"].mean(), skm.f1_score(y, pred, average="macro"))


def test_auc_matches_sklearn_including_ties():
    logits, y = _data()
    probs = M.softmax(np.round(logits, 1))  # rounding creates ties
    auc = M.roc_auc_ovr(probs, y)
    np.testing.assert_allclose(
        auc["macro"], skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"), rtol=1e-10
    )
    for k in range(5):
        np.testing.assert_allclose(auc["per_class"][k], skm.roc_auc_score(y == k, probs[:, k]), rtol=1e-10)


def test_roc_curve_matches_sklearn():
    logits, y = _data(seed=1)
    scores = np.round(M.softmax(logits)[:, 2], 2)
    fpr, tpr = M.roc_curve(scores, y == 2)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y == 2, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_ece_hand_worked():
    # Two bins used: confidence 0.9 (2 examples, 1 correct) and 0.6 (2 examples, 2 correct).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    assert M.expected_calibration_error(probs, labels, num_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_report_keys_and_agreement():
    logits, y = _data()
    rep = M.classification_report(logits, y, 5, teacher_logits=logits)
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, logits.argmax(1)))
    assert rep["loss"] == pytest.approx(skm.log_loss(y, M.softmax(logits), labels=range(5)), rel=1e-6)
    assert rep["teacher_agreement"] == 1.0 and rep["teacher_kl"] == pytest.approx(0.0, abs=1e-12)
    for key in ("precision", "recall", "f1", "macro_f1", "auc_ovr", "macro_auc_ovr", "ece", "confusion_matrix"):
        assert key in rep


def test_temperature_scaling_recovers_an_overconfidence_factor():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4000, 6)) * 1.5
    labels = np.array([rng.choice(6, p=M.softmax(row)) for row in z])  # labels drawn from softmax(z)
    t = M.fit_temperature(3.0 * z, labels)  # an over-confident model: logits x3
    assert 2.6 < t < 3.4
    before = M.expected_calibration_error(M.softmax(3.0 * z), labels)
    after = M.expected_calibration_error(M.softmax(3.0 * z / t), labels)
    assert after < 0.5 * before


def test_accuracy_and_loss_of_many_students_by_hand():
    from jkd.evaluate.predict import accuracy_and_loss

    labels = np.array([0, 1])
    logits = np.array(
        [
            [[2.0, 0.0], [0.0, 0.0]],  # student 0: right, a tie (argmax 0: wrong)
            [[0.0, 1.0], [-1.0, 3.0]],
        ]
    )  # student 1: wrong, right
    acc, loss = accuracy_and_loss(logits, labels)
    np.testing.assert_array_equal(acc, [0.5, 0.5])
    ce = lambda z, y: -(z[y] - np.log(np.exp(z).sum()))  # noqa: E731
    np.testing.assert_allclose(
        loss, [(ce(logits[0, 0], 0) + np.log(2)) / 2, (ce(logits[1, 0], 0) + ce(logits[1, 1], 1)) / 2], rtol=1e-12
    )


def test_predict_drops_the_padding_of_the_last_batch():
    from jkd.data import pipeline as P
    from jkd.evaluate.predict import predict

    images = np.arange(5 * 2 * 2 * 1, dtype=np.uint8).reshape(5, 2, 2, 1)
    data = P.InMemory(images, np.arange(5, dtype=np.int32) % 3)
    logits, labels = predict(
        lambda b: np.stack([b["image"][:, 0, 0, 0]] * 3, -1).astype(np.float32), data, batch_size=2
    )
    assert logits.shape == (5, 3) and labels.tolist() == [0, 1, 2, 0, 1]
    np.testing.assert_array_equal(logits[:, 0], images[:, 0, 0, 0])
