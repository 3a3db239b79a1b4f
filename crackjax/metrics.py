"""Classification metrics: accuracy, per-class precision/recall/F1, confusion matrix, ROC-AUC."""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Return the area under the ROC curve of `scores` for boolean `positives`, or None if one class is absent.

    Computed as the Mann-Whitney U statistic with average ranks for ties, which equals
    the trapezoidal area under the ROC curve.
    """
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    positive_count = int(positives.sum())
    negative_count = len(positives) - positive_count
    if positive_count == 0 or negative_count == 0:
        return None

    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    rank_sum = ranks[positives].sum()
    return float((rank_sum - positive_count * (positive_count + 1) / 2.0) / (positive_count * negative_count))


def classification_metrics(label_ids: np.ndarray, probabilities: np.ndarray, labels: list[str]) -> dict:
    """Compute test metrics from true `(n,)` label ids and `(n, classes)` probabilities.

    ROC-AUC is that of the second class's probability for two classes, and the macro
    average of one-vs-rest AUCs for more. Classes absent from the labels are left out.
    """
    label_ids = np.asarray(label_ids, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    predicted = probabilities.argmax(axis=1)
    classes = len(labels)

    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (label_ids, predicted), 1)

    per_class = {}
    for index, label in enumerate(labels):
        true_positive = confusion[index, index]
        predicted_count = confusion[:, index].sum()
        actual_count = confusion[index, :].sum()
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / actual_count if actual_count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(actual_count)}

    if classes == 2:
        auc = roc_auc(probabilities[:, 1], label_ids == 1)
    else:
        aucs = [roc_auc(probabilities[:, index], label_ids == index) for index in range(classes)]
        aucs = [value for value in aucs if value is not None]
        auc = float(np.mean(aucs)) if aucs else None

    return {
        "count": int(len(label_ids)),
        "accuracy": float((predicted == label_ids).mean()) if len(label_ids) else 0.0,
        "macro_f1": float(np.mean([item["f1"] for item in per_class.values()])),
        "roc_auc": auc,
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": confusion.tolist(),
    }


def format_metrics_table(metrics: dict, title: str = "test") -> str:
    """Render metrics as a plain-text table: per-class rows, then the confusion matrix (rows are true labels)."""
    labels = metrics["labels"]
    width = max(8, *(len(label) for label in labels))
    auc = "n/a" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.4f}"
    lines = [
        f"{title}: {metrics['count']} images, accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, ROC-AUC {auc}",
        f"{'label':<{width}}  precision  recall  f1      support",
    ]
    for label in labels:
        row = metrics["per_class"][label]
        lines.append(f"{label:<{width}}  {row['precision']:<9.4f}  {row['recall']:<6.4f}  {row['f1']:<6.4f}  {row['support']}")
    lines.append("confusion matrix (rows: true label, columns: predicted label)")
    lines.append(" " * width + "  " + "  ".join(f"{label:>{width}}" for label in labels))
    for label, row in zip(labels, metrics["confusion_matrix"]):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{count:>{width}}" for count in row))
    return "\n".join(lines)
