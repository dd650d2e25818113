"""Choosing by validation: the one rule every report, the paper targets, the ensemble and the sweep's saved
heads use.

The rule: the highest validation accuracy wins; among equal validation accuracies, the candidate whose name
sorts first (a cell name, a folder path, a seed). Test accuracy never chooses anything; a tie never depends on
the order candidates arrived in, nor on how long they took to train.
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

TIE_RULE = "highest validation accuracy; ties: the name that sorts first"


def _tie_name(value) -> tuple:
    """Numbers (seeds) sort as numbers, anything else as text; numbers before text."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def rank_by_validation(candidates: Iterable[T], *, val: Callable[[T], float], name: Callable[[T], object]) -> list[T]:
    """Candidates best first by TIE_RULE. `val` may return a tuple (e.g. validation on one manifest, then the mean
    over all): it is compared before the name."""
    def key(c):
        v = val(c)
        return tuple(-x for x in (v if isinstance(v, tuple) else (v,))), _tie_name(name(c))
    return sorted(candidates, key=key)


def best_by_validation(candidates: Iterable[T], *, val: Callable[[T], float],
                       name: Callable[[T], object]) -> T | None:
    """The first of rank_by_validation, or None when there is no candidate."""
    ranked = rank_by_validation(candidates, val=val, name=name)
    return ranked[0] if ranked else None


def best_summary(summaries: Iterable[dict]) -> dict | None:
    """The best report summary (keys `val_accuracy_mean`, `cell`) by TIE_RULE."""
    return best_by_validation(summaries, val=lambda c: c["val_accuracy_mean"], name=lambda c: c["cell"])
