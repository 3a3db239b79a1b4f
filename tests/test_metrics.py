"""Metrics against scikit-learn's reference implementations."""

from __future__ import annotations

import numpy as np
import pytest

from crackjax.metrics import classification_metrics, format_metrics_table, roc_auc

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + labels * 0.3, 1)  # rounding makes ties

    assert roc_auc(scores, labels == 1) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))


def test_roc_auc_single_class_is_none():
    assert roc_auc(np.array([0.1, 0.9]), np.array([True, True])) is None


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[labels] * 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)

    metrics = classification_metrics(labels, probabilities, ["a", "b", "c"])

    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(labels, predicted)
    assert metrics["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predicted))
    assert metrics["confusion_matrix"] == sklearn_metrics.confusion_matrix(labels, predicted).tolist()
    for index, label in enumerate("abc"):
        assert metrics["per_class"][label]["precision"] == pytest.approx(precision[index])
        assert metrics["per_class"][label]["recall"] == pytest.approx(recall[index])
        assert metrics["per_class"][label]["f1"] == pytest.approx(f1[index])
        assert metrics["per_class"][label]["support"] == support[index]
    expected_auc = sklearn_metrics.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    assert metrics["roc_auc"] == pytest.approx(expected_auc)


def test_metrics_table_lists_labels_and_matrix():
    metrics = classification_metrics(np.array([0, 1, 1]), np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]), ["CD", "UD"])

    table = format_metrics_table(metrics)

    assert "accuracy 0.6667" in table
    assert "confusion matrix" in table
    assert table.splitlines()[-1].split() == ["UD", "1", "1"]
