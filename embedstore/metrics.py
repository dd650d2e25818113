"""Metrics, computed in one place for modules, heads, decision-level models and end-to-end models (scikit-learn's
definitions), always over the full label set: a class missing from a split then counts the same (F1 0 when it is
also never predicted) whichever kind of model the row comes from."""
from __future__ import annotations

import numbers

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def accuracy(labels, predictions) -> float:
    """The share of predictions equal to their labels (no class set involved: early stopping's validation score)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no rows to score")
    return float(accuracy_score(labels, np.asarray(predictions)))


def classification_metrics(labels, predictions, *, n_classes: int) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of integer predictions against integer labels, both (n,).

    Macro-F1 averages over every class 0..n_classes-1 (labels=range(C)); a class absent from both labels and
    predictions counts as F1 0. `n_classes` is required: scikit-learn's default (the classes that occur in either)
    gives another number as soon as a split lacks a class, so rows of different model kinds would disagree."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 1:
        raise ValueError(f"n_classes must be the number of classes (an integer of at least 1), got {n_classes!r}")
    if len(labels) == 0:
        raise ValueError("no rows to score")
    return {"accuracy": accuracy(labels, predictions),
            "macro_f1": float(f1_score(labels, predictions, labels=list(range(int(n_classes))), average="macro",
                                       zero_division=0))}
