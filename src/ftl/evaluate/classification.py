"""Accuracy, precision, recall, F1 (macro) and the confusion matrix, from scikit-learn."""

from __future__ import annotations


def classification_metrics(labels: list[int], predictions: list[int], names: list[str] | None = None) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = sorted(set(labels) | set(predictions))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=classes, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
        "classes": [names[c] if names else c for c in classes],
    }
