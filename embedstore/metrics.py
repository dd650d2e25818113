"""Metrics, computed in one place for modules, heads, decision-level models and end-to-end models, always over the
full label set: a class missing from a split then counts the same (F1 0 when it is also never predicted) whichever
kind of model the row comes from.

The definitions are scikit-learn's (`accuracy_score`; `f1_score(labels=range(C), average="macro",
zero_division=0)`), computed here with numpy's bincount: importing sklearn.metrics costs about 1.3 s of CPU, and
every process that trains -- each `--jobs` worker and torchrun rank of a sweep, each CLI run -- scores what it
trains. tests/test_metrics.py checks both numbers against scikit-learn's on random and degenerate inputs."""
from __future__ import annotations

import numbers

import numpy as np


def accuracy(labels, predictions) -> float:
    """The share of predictions equal to their labels (no class set involved: early stopping's validation score)."""
    labels, predictions = _pair(labels, predictions)
    return float(np.mean(labels == predictions))


def macro_f1(labels, predictions, *, n_classes: int) -> float:
    """The mean over classes 0..n_classes-1 of 2 TP / (2 TP + FP + FN), a class with no label and no prediction
    counting 0 (scikit-learn's zero_division=0). Labels and predictions outside that range count as neither
    class's true positives, but as a false positive / negative of the class they were mistaken for."""
    labels, predictions = _pair(labels, predictions)
    _check_classes(n_classes)

    def per_class(values: np.ndarray) -> np.ndarray:   # (n_classes,) counts; an out-of-range value is no class's
        return np.bincount(values[(values >= 0) & (values < n_classes)].astype(np.int64), minlength=n_classes)

    true_positive = per_class(labels[labels == predictions])
    predicted = per_class(predictions)   # TP + FP per class
    actual = per_class(labels)           # TP + FN per class
    denominator = predicted + actual
    f1 = np.divide(2.0 * true_positive, denominator, out=np.zeros(n_classes), where=denominator > 0)
    return float(f1.mean())


def classification_metrics(labels, predictions, *, n_classes: int) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of integer predictions against integer labels, both (n,).

    Macro-F1 averages over every class 0..n_classes-1 (labels=range(C)); a class absent from both labels and
    predictions counts as F1 0. `n_classes` is required: scikit-learn's default (the classes that occur in either)
    gives another number as soon as a split lacks a class, so rows of different model kinds would disagree."""
    f1 = macro_f1(labels, predictions, n_classes=n_classes)   # first: it checks n_classes
    return {"accuracy": accuracy(labels, predictions), "macro_f1": f1}


def _check_classes(n_classes) -> None:
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 1:
        raise ValueError(f"n_classes must be the number of classes (an integer of at least 1), got {n_classes!r}")


def _pair(labels, predictions) -> tuple[np.ndarray, np.ndarray]:
    labels, predictions = np.asarray(labels).ravel(), np.asarray(predictions).ravel()
    if len(labels) == 0:
        raise ValueError("no rows to score")
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels against {len(predictions)} predictions")
    return labels, predictions
