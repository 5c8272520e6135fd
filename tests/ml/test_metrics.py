"""Metrics from probabilities: known answers on hand-made predictions, and no NaN ever."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sweeper.ml.metrics import evaluate_probabilities, predict_proba, prefixed

CLASSES = ["cat", "dog", "bird"]


def _all_finite(metrics: dict[str, float]) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_perfect_predictor_scores_one() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2, 2])
    probs = np.eye(3, dtype=np.float32)[labels]
    ev = evaluate_probabilities(probs, labels, CLASSES)
    m = ev.metrics
    for key in ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro",
                "auc_macro", "auc_micro", "f1_cat", "auc_bird"):
        assert m[key] == pytest.approx(1.0), key
    assert m["loss"] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_array_equal(ev.confusion, np.diag([2, 2, 3]))
    assert set(ev.roc) == {"micro", "macro", "cat", "dog", "bird"}
    assert ev.report["accuracy"] == pytest.approx(1.0)
    assert ev.probabilities.dtype == np.float32 and ev.probabilities.shape == (7, 3)
    assert _all_finite(m)


def test_known_confusion_matrix_and_metrics() -> None:
    # true:      0    0    0    1    1    2
    # predicted: 0    0    1    1    2    2
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1],
                      [0.6, 0.3, 0.1],
                      [0.3, 0.6, 0.1],
                      [0.2, 0.7, 0.1],
                      [0.1, 0.2, 0.7],
                      [0.1, 0.1, 0.8]], dtype=np.float32)
    ev = evaluate_probabilities(probs, labels, CLASSES)
    np.testing.assert_array_equal(ev.confusion, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    m = ev.metrics
    assert m["accuracy"] == pytest.approx(4 / 6)
    # cat: P 2/2, R 2/3; dog: P 1/2, R 1/2; bird: P 1/2, R 1/1
    assert m["precision_cat"] == pytest.approx(1.0)
    assert m["recall_cat"] == pytest.approx(2 / 3)
    assert m["f1_dog"] == pytest.approx(0.5)
    assert m["f1_bird"] == pytest.approx(2 / 3)
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["recall_weighted"] == pytest.approx(m["accuracy"])
    expected_loss = -np.mean(np.log([0.8, 0.6, 0.3, 0.7, 0.2, 0.8]))
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert 0.0 <= m["auc_macro"] <= 1.0 and 0.0 <= m["auc_micro"] <= 1.0
    assert _all_finite(m)


def test_class_missing_from_labels_gives_finite_metrics() -> None:
    labels = np.array([0, 1, 0, 1])  # no "bird" at all, yet the model sometimes says bird
    probs = np.array([[0.7, 0.2, 0.1],
                      [0.2, 0.5, 0.3],
                      [0.1, 0.2, 0.7],
                      [0.3, 0.6, 0.1]], dtype=np.float32)
    ev = evaluate_probabilities(probs, labels, CLASSES)
    m = ev.metrics
    assert _all_finite(m)
    assert "auc_bird" not in m and "bird" not in ev.roc
    assert m["auc_macro"] == pytest.approx((m["auc_cat"] + m["auc_dog"]) / 2)
    assert m["recall_bird"] == 0.0 and m["precision_bird"] == 0.0
    assert ev.confusion.shape == (3, 3) and ev.confusion[2].sum() == 0


def test_single_class_labels_never_nan() -> None:
    labels = np.array([1, 1, 1])
    probs = np.full((3, 3), 1 / 3, dtype=np.float32)
    m = evaluate_probabilities(probs, labels, CLASSES).metrics
    assert _all_finite(m)
    assert "auc_macro" not in m  # no class has both positives and negatives


def test_zero_probability_on_the_truth_gives_finite_loss() -> None:
    labels = np.array([0, 1])
    probs = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    m = evaluate_probabilities(probs, labels, CLASSES).metrics
    assert math.isfinite(m["loss"]) and m["loss"] > 20


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        evaluate_probabilities(np.zeros((2, 2)), np.array([0, 1]), CLASSES)


def test_predict_proba_softmax_on_cpu_restores_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    model.train()
    x = torch.randn(5, 1, 2, 2)
    probs = predict_proba(model, x, batch_size=2)
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"
    assert probs.shape == (5, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(probs, torch.softmax(model(x), dim=1).detach())
    assert model.training


def test_prefixed() -> None:
    assert prefixed({"accuracy": 0.9, "f1_cat": 0.5}, "val") == {"val_accuracy": 0.9,
                                                                 "val_f1_cat": 0.5}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_and_curves_match_scikit_learn(seed: int) -> None:
    """sweeper computes them in NumPy; scikit-learn is the reference."""
    from sklearn import metrics as sk

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[labels]
    logits[:40] = np.round(logits[:40])  # ties in the scores
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    ev = evaluate_probabilities(probs, labels, CLASSES)
    predictions = probs.argmax(axis=1)
    for average in ("macro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(labels, predictions, average=average,
                                                        labels=[0, 1, 2], zero_division=0)
        assert ev.metrics[f"precision_{average}"] == pytest.approx(p)
        assert ev.metrics[f"recall_{average}"] == pytest.approx(r)
        assert ev.metrics[f"f1_{average}"] == pytest.approx(f)
    report = sk.classification_report(labels, predictions, labels=[0, 1, 2],
                                      target_names=CLASSES, output_dict=True, zero_division=0)
    assert set(ev.report) == set(report)
    for key, value in report.items():
        expected = value if isinstance(value, dict) else {"value": value}
        got = ev.report[key] if isinstance(value, dict) else {"value": ev.report[key]}
        assert got == pytest.approx(expected), key
    onehot = np.eye(3, dtype=np.int8)[labels]
    for index, name in enumerate(CLASSES):
        fpr, tpr, _ = sk.roc_curve(onehot[:, index], probs[:, index])
        np.testing.assert_allclose(ev.roc[name][0], fpr)
        np.testing.assert_allclose(ev.roc[name][1], tpr)
        assert ev.metrics[f"auc_{name}"] == pytest.approx(sk.auc(fpr, tpr))
    fpr, tpr, _ = sk.roc_curve(onehot.ravel(), probs.ravel())
    np.testing.assert_allclose(ev.roc["micro"][0], fpr)
    assert ev.metrics["auc_micro"] == pytest.approx(sk.roc_auc_score(onehot.ravel(),
                                                                     probs.ravel()))


def test_eval_batch_size_is_chosen_per_device_and_changes_no_result() -> None:
    from sweeper.ml.metrics import EVAL_BATCH_SIZE, eval_batch_size

    assert eval_batch_size("cpu") == EVAL_BATCH_SIZE["cpu"]
    assert eval_batch_size(torch.device("cuda", 0)) == EVAL_BATCH_SIZE["cuda"]
    assert eval_batch_size("cpu", 7) == 7
    with pytest.raises(ValueError, match="batch_size >= 1"):
        eval_batch_size("cpu", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    x = torch.randn(37, 1, 8, 8)
    whole = predict_proba(model, x, batch_size=64)
    torch.testing.assert_close(predict_proba(model, x), whole)
    torch.testing.assert_close(predict_proba(model, x, batch_size=5), whole)
    assert whole.shape == (37, 4) and whole.device.type == "cpu"
