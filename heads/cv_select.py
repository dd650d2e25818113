"""Choosing by cross-validation (`--select cv:K`) instead of by the one validation split (`--select validation`,
the default).

A validation split of 25 items per class is small: the model that tops it is partly the luckiest on it, and its
validation accuracy overstates what it does on new items (on the real catalog, val 98.4 % against test 97.3 %).
With cv:K every saved model (heads/members.py: one folder per cell) is refit K times by its own recorded
procedure on train + validation: the items of both splits that every candidate scores are dealt to K stratified
folds (seeded); for fold k, the other K - 1 folds are split per class into a training part and an early-stopping /
hyper-parameter part in the proportion of the store's own train : val (so a head still stops early and a regression
still chooses its C, on items other than fold k's), the model is fit with its saved configuration, seed and settings,
and fold k is predicted. Fold k's items are never seen by that fit. A candidate's CV accuracy is the accuracy of its
out-of-fold predictions over all of train + val; an ensemble of candidates is scored on their averaged out-of-fold
probabilities. The test split is never read here. The models that are scored on validation and test afterwards are
the saved ones (trained on train), so a row shows the chosen model's CV, validation and test accuracy side by side.

Refit: fusion heads (heads/train.py, one head per fold) and decision-level models (heads/decision.py's fits). Other
model kinds (end to end) are refused in one line. Cost: K fits per candidate (measured:
benchmarks/results/selection_cost.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from heads.joined import joins_in, open_store

VALIDATION = "validation"


@dataclass(frozen=True)
class Selection:
    """How models are chosen: "validation" (the recorded validation accuracy) or K-fold CV on train + val."""
    how: str = VALIDATION
    folds: int | None = None
    seed: int = 0

    @property
    def label(self) -> str:
        return VALIDATION if self.how == VALIDATION else f"cv:{self.folds}"


def parse_select(text: str | Selection | None) -> Selection:
    """"validation" or "cv:K" (K >= 2 stratified folds); a one-line ValueError otherwise."""
    if isinstance(text, Selection):
        return text
    value = (text or VALIDATION).strip().lower()
    if value == VALIDATION:
        return Selection()
    if value.startswith("cv:"):
        try:
            k = int(value[3:])
        except ValueError:
            k = None
        if k is not None and k >= 2:
            return Selection("cv", k)
        raise ValueError(f"--select {text}: K must be an integer of at least 2 (cv:5 = 5 stratified folds)")
    raise ValueError(f"--select must be 'validation' or 'cv:K' (e.g. cv:5), got {text!r}")


@dataclass
class CrossValidation:
    """Out-of-fold probabilities of each candidate over the same train + val items."""
    folds: int
    ids: np.ndarray                    # (n,) item ids of train + val that every candidate scores
    labels: np.ndarray                 # (n,) class index in `classes`
    classes: tuple[str, ...]
    fold_of: np.ndarray                # (n,) the fold each item is held out in
    oof: dict[Path, np.ndarray] = field(default_factory=dict)      # folder -> (n, C) columns in `classes` order
    seconds: dict[Path, float] = field(default_factory=dict)       # folder -> refit time (all K folds)

    def accuracy(self, folders: list[Path]) -> float:
        """CV accuracy of the mean out-of-fold probabilities of these candidates (one: its own)."""
        mean = np.mean([self.oof[f] for f in folders], axis=0)   # (n, C)
        return float((mean.argmax(axis=1) == self.labels).mean())

    def fold_accuracies(self, folder: Path) -> list[float]:
        right = self.oof[folder].argmax(axis=1) == self.labels
        return [float(right[self.fold_of == k].mean()) for k in range(self.folds)]


def cross_validate(members: list, selection: Selection, *, device: str | torch.device = "cpu",
                   log: Callable[[str], None] = print) -> CrossValidation:
    """Refit every member (heads/members.Member) on K folds of train + val; see the module docstring."""
    for member in members:
        if member.kind not in REFITS:
            raise ValueError(f"--select {selection.label} refits heads and decision-level models only; "
                             f"{member.folder} holds a model of kind {member.kind} (choose with --select validation)")
    data = {m.folder: _load(m) for m in members}
    common = set.intersection(*(set(d["ids"]) for d in data.values()))
    ids = np.array(sorted(common), dtype=object)
    classes = tuple(data[members[0].folder]["classes"])
    label_of = {}
    for d in data.values():
        label_of.update(zip(d["ids"], d["labels"]))
    labels = np.array([classes.index(label_of[i]) for i in ids], dtype=np.int64)
    fold_of = assign_folds(labels, selection.folds, selection.seed, classes)
    cv = CrossValidation(selection.folds, ids, labels, classes, fold_of)
    val_share = np.mean([d["val_share"] for d in data.values()])
    for member in members:
        start = time.perf_counter()
        d = data[member.folder]
        rows = np.array([d["row_of"][i] for i in ids])
        features = [x[rows] for x in d["features"]]
        oof = np.zeros((len(ids), len(classes)))
        for k in range(selection.folds):
            split = inner_split(labels, fold_of, k, val_share, selection.seed)
            proba = REFITS[member.kind](member, features, labels, split, classes, device)   # (n_k, C), classes order
            oof[fold_of == k] = proba
        cv.oof[member.folder], cv.seconds[member.folder] = oof, time.perf_counter() - start
        log(f"{member.folder.name}: {selection.label} accuracy {100 * cv.accuracy([member.folder]):.2f} % "
            f"(validation {100 * member.val_accuracy:.2f} %), refit in {cv.seconds[member.folder]:.1f} s")
    return cv


def assign_folds(labels: np.ndarray, folds: int, seed: int, classes) -> np.ndarray:
    """(n,) fold of each item: stratified (each class dealt round-robin after a seeded shuffle); a one-line
    ValueError when a class has fewer items than folds."""
    counts = np.bincount(labels, minlength=len(classes))
    present = counts[counts > 0]
    if len(present) == 0 or present.min() < folds:
        small = int(np.flatnonzero(counts == present.min())[0]) if len(present) else 0
        raise ValueError(f"--select cv:{folds} needs at least {folds} train + val items of every class; class "
                         f"{classes[small]!r} has {int(present.min()) if len(present) else 0} (use fewer folds)")
    rng = np.random.default_rng([seed, folds])
    fold_of = np.empty(len(labels), dtype=np.int64)
    for c in np.flatnonzero(counts):
        rows = np.flatnonzero(labels == c)
        fold_of[rng.permutation(rows)] = (np.arange(len(rows)) + rng.integers(folds)) % folds
    return fold_of


def inner_split(labels: np.ndarray, fold_of: np.ndarray, k: int, val_share: float, seed: int) -> np.ndarray:
    """(n,) "train" / "val" / "test" for fold k: fold k is "test" (held out); of the rest, per class, a seeded
    `val_share` (at least one item when the class has two) is "val", the early-stopping and choosing part."""
    split = np.where(fold_of == k, "test", "train").astype(object)
    rng = np.random.default_rng([seed, k, 7])
    for c in np.unique(labels):
        rows = np.flatnonzero((labels == c) & (fold_of != k))
        if len(rows) < 2:
            continue
        n_val = min(len(rows) - 1, max(1, int(round(val_share * len(rows)))))
        split[rng.permutation(rows)[:n_val]] = "val"
    return split


def _load(member) -> dict:
    """The member's train + val rows from its store (joined sources included), by item id."""
    with open_store(member.store_path, joins_in(member.inputs)) as store:
        loaded = store.load(list(member.inputs))
        classes = list(store.classes)
    keep = np.isin(loaded.split, ("train", "val"))
    ids = loaded.ids[keep]
    n_train, n_val = int((loaded.split == "train").sum()), int((loaded.split == "val").sum())
    return {"ids": ids.tolist(), "row_of": {i: r for r, i in enumerate(ids)}, "classes": classes,
            "labels": [classes[j] for j in loaded.labels[keep]], "val_share": n_val / max(1, n_train + n_val),
            "features": [loaded.features[n][keep] for n in member.inputs]}


def _in_classes(proba: np.ndarray, model_classes, classes) -> np.ndarray:
    columns = [list(map(str, model_classes)).index(c) for c in classes]
    return proba[:, columns]


def _refit_head(member, features, labels, split, classes, device) -> np.ndarray:
    """A fusion head refit with its saved config, seed and training settings; fold k's probabilities."""
    from heads.estimator import FusionHead, torch_threads
    from heads.train import HeadData, TrainSettings, train_heads

    saved = FusionHead.from_pretrained(member.folder)
    recorded = dict(saved.metadata_.get("train_settings") or {})
    if "betas" in recorded:
        recorded["betas"] = tuple(recorded["betas"])
    data = HeadData.from_arrays(features, labels, split, device)
    with torch_threads(1):
        result = train_heads(saved.config_, [int(saved.seed)], data, TrainSettings(**recorded))[0]
        head = FusionHead.from_trained(saved.config_, result.params, list(classes), seed=saved.seed)
        return head.predict_proba([x[split == "test"] for x in features])


def _refit_linear(member, features, labels, split, classes, device) -> np.ndarray:
    """A decision-level model refit by its own procedure (C / w chosen on the fold's choosing part)."""
    from heads.decision import DecisionFits, DecisionModel, LinearSettings
    from heads.strategies import get_strategy
    from heads.train import HeadData

    saved = DecisionModel.from_pretrained(member.folder)
    recorded = {"solver": "sklearn", **(saved.metadata.get("train_settings") or {})}   # rows leave "sklearn" out
    settings = LinearSettings(**recorded)
    columns = {m: i for i, m in enumerate(get_strategy(saved.strategy).modalities)}
    fits = DecisionFits(HeadData.from_arrays(features, labels, split), columns, len(classes), settings,
                        device=device)
    model = fits.model(saved.strategy, int(saved.metadata.get("seed", 0)), list(classes))[0]
    return _in_classes(model.predict_proba([x[split == "test"] for x in features]), model.classes, classes)


# model kind (config.json "kind") -> refit(member, features, labels, split, classes, device) -> (n_test, C)
REFITS: dict[str, Callable] = {"fusion-head": _refit_head, "linear": _refit_linear}



def format_selection(row: dict) -> str:
    """The sentence an ensemble summary adds when it chose by cross-validation: CV, validation and test side by side."""
    if not row.get("select") or row["select"] == VALIDATION:
        return ""
    single = row["best_single"]
    return (f" Chosen by {row['select']} on train + validation ({row['selection_seconds']:.1f} s of refits): the "
            f"ensemble's CV accuracy {100 * row['cv_accuracy']:.2f} %, validation {100 * row['val_accuracy']:.2f} %, "
            f"test {100 * row['test_accuracy']:.2f} %; the best single model by CV, {single['member']}: CV "
            f"{100 * single['cv_accuracy']:.2f} %, validation {100 * single['val_accuracy']:.2f} %, test "
            f"{100 * single['test_accuracy']:.2f} %.")
