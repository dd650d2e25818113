"""Metrics, computed in one place for modules, heads and end-to-end models (scikit-learn's definitions)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def classification_metrics(labels, predictions) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of integer predictions against integer labels, both (n,)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if len(labels) == 0:
        raise ValueError("no rows to score")
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0))}
