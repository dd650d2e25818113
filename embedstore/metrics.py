"""Metrics, computed in one place for modules, heads and end-to-end models (scikit-learn's definitions)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def classification_metrics(labels, predictions, *, n_classes: int | None = None) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of integer predictions against integer labels, both (n,).

    `n_classes`: macro-F1 averages over every class 0..n_classes-1 (a class absent from both labels and
    predictions counts as F1 0); without it, over the classes that occur in either (scikit-learn's default)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if len(labels) == 0:
        raise ValueError("no rows to score")
    classes = None if n_classes is None else list(range(n_classes))
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0))}
