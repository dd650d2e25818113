"""embedstore/metrics.py computes scikit-learn's accuracy and macro-F1 without importing it: the same numbers."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from embedstore.metrics import accuracy, classification_metrics, macro_f1


def sklearn_macro_f1(labels, predictions, n_classes):
    return f1_score(labels, predictions, labels=list(range(n_classes)), average="macro", zero_division=0)


@pytest.mark.parametrize("seed", range(40))
def test_random_labels_and_predictions_score_as_scikit_learn_scores_them(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(1, 12))
    n = int(rng.integers(1, 60))
    labels = rng.integers(0, n_classes, n)
    # often right, often one class never predicted or never present: the cases zero_division decides
    predictions = np.where(rng.random(n) < rng.random(), labels, rng.integers(0, max(1, n_classes - 1), n))
    got = classification_metrics(labels, predictions, n_classes=n_classes)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(sklearn_macro_f1(labels, predictions, n_classes), abs=1e-12)


@pytest.mark.parametrize("labels, predictions, n_classes", [
    ([0, 0, 0], [0, 0, 0], 1),          # one class, all right
    ([0, 0, 0], [0, 0, 0], 4),          # classes 1-3 absent from both: F1 0 each
    ([1, 2, 3], [0, 0, 0], 4),          # all wrong
    ([0, 1, 2, 3], [3, 2, 1, 0], 4),
    ([0, 1], [0, 5], 3),                # a prediction outside the classes: a miss, no class's false positive
    ([[0], [1]], [[0], [1]], 2),        # column vectors, as some callers hold them
])
def test_edge_cases_score_as_scikit_learn_scores_them(labels, predictions, n_classes):
    flat_labels, flat_predictions = np.ravel(labels), np.ravel(predictions)
    assert accuracy(labels, predictions) == pytest.approx(accuracy_score(flat_labels, flat_predictions))
    assert macro_f1(labels, predictions, n_classes=n_classes) == pytest.approx(
        sklearn_macro_f1(flat_labels, flat_predictions, n_classes))


def test_bad_calls_are_one_line_errors():
    with pytest.raises(ValueError, match="no rows to score"):
        accuracy([], [])
    with pytest.raises(ValueError, match="3 labels against 2 predictions"):
        classification_metrics([0, 1, 1], [0, 1], n_classes=2)
    for bad in (0, 2.0, True, None):
        with pytest.raises(ValueError, match="n_classes must be the number of classes"):
            classification_metrics([0], [0], n_classes=bad)

