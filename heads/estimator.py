"""`FusionHead`: one fusion head as a scikit-learn estimator, for notebooks and scikit-learn's tools.

    X = np.hstack([X_img, X_txt])                        # (n, 1280 + 384): the modalities side by side, image first
    head = FusionHead("2A", "concat", input_widths=(1280, 384)).fit(X, y, eval_set=(X_val, y_val))
    head.predict(X); head.predict_proba(X); head.score(X, y); head.classes_
    cross_val_score(head, X, y, cv=3); GridSearchCV(head, {"lr": [...], "fusion": [...]}); make_pipeline(...)
    head.save_pretrained(folder); FusionHead.from_pretrained(folder)
    data = feature_matrices(store, inputs_for(store, "2A"))  # a store's splits as (X, y), and their input_widths

X is one 2-D array, so that scikit-learn can index its rows (cross-validation, pipelines); `input_widths` says
where one modality's columns end and the next begin (a baseline reads all columns: one width, or None). The
older input, a list of (n, D_m) arrays one per modality, is still taken (widths then come from the arrays).
`fit` is the sweep's training code (heads.train.train_heads with one seed), not a loop of its own, on
`num_threads` torch threads as the sweep uses (1: tiny heads only lose time to thread barriers; the caller's
thread count is restored afterwards). Labels may be strings (`classes_` is sorted like numpy.unique, and
`predict` returns the original labels). Bad input is a one-line ValueError naming the input and the fix, not a
torch error. Saved with the model-folder convention (embedstore/model_folder.py, kind "fusion-head").
"""
from __future__ import annotations

import contextlib
import numbers
import os
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError  # a ValueError (and an AttributeError), as sklearn raises it
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets

from embedstore.model_folder import load_pretrained, save_pretrained
from heads.models import HeadConfig, StackedHead, predict_logits
from heads.strategies import get_strategy, list_strategies
from embedstore.defaults import resolve_device
from heads.estimator_inputs import check_labels, modality_inputs, widths_param
from heads.train import HeadData, Split, TrainSettings, train_heads

KIND = "fusion-head"


class FusionHead(ClassifierMixin, BaseEstimator):
    """One fusion head (strategy 1A/1B/2A/2B, or the "image"/"text" baseline) over precomputed features.

    X is one (n, sum(input_widths)) array: the image columns, then the text columns. input_widths=(D_image,
    D_text) for the multimodal strategies; a baseline takes one width or None (all columns). A list of (n, D_m)
    arrays, one per modality, image first, is taken too. fusion=None means "concat" for the multimodal
    strategies (baselines take none). Without `eval_set`, a stratified `validation_fraction` of the training
    rows is held out for early stopping. Training settings are constructor parameters (as in scikit-learn), so
    GridSearchCV can search them. num_threads: torch threads while fitting and predicting (None: leave torch's).
    Learned: classes_, input_widths_ (= input_dims_), n_features_in_, config_ (a HeadConfig), params_ (the
    weights), best_val_accuracy_, best_epoch_, n_epochs_.
    """

    def __init__(self, strategy: str = "2A", fusion: str | None = None, *, input_widths=None, seed: int = 0,
                 validation_fraction: float = 0.15, batch_size: int = 128, lr: float = 1e-3,
                 weight_decay: float = 0.01, max_epochs: int = 40, patience: int = 5, precision: str = "auto",
                 dropout: float = 0.3, middle_dim: int = 500, fusion_dim: int = 250, device: str | None = None,
                 num_threads: int | None = 1):
        # scikit-learn convention: store the parameters as given, check them in fit (clone and set_params rely on it)
        self.strategy, self.fusion, self.input_widths, self.seed = strategy, fusion, input_widths, seed
        self.validation_fraction = validation_fraction
        self.batch_size, self.lr, self.weight_decay = batch_size, lr, weight_decay
        self.max_epochs, self.patience, self.precision = max_epochs, patience, precision
        self.dropout, self.middle_dim, self.fusion_dim, self.device = dropout, middle_dim, fusion_dim, device
        self.num_threads = num_threads

    # ------------------------------------------------------------------------------------------- fit

    def fit(self, X, y, *, eval_set=None) -> "FusionHead":
        """Train on X, y; early stopping on eval_set = (X_val, y_val), or on a held-out part of X, y."""
        with torch_threads(self.num_threads):
            return self._fit(X, y, eval_set)

    def _fit(self, X, y, eval_set) -> "FusionHead":
        modalities = self._modalities()
        widths = widths_param(self.input_widths, self.strategy, modalities)
        inputs = modality_inputs(X, modalities, widths, name="X", strategy=self.strategy)
        if not len(inputs[0]):
            raise ValueError("X has 0 rows; fit needs training rows of at least two classes")
        labels = check_labels(y, len(inputs[0]), name="y")
        try:
            classes = np.unique(labels)
        except TypeError:
            raise ValueError("y mixes label types (e.g. numbers and strings); use one type") from None
        check_classification_targets(labels)  # "Unknown label type: continuous ..." for a regression target
        if len(classes) < 2:
            raise ValueError(f"y holds one class ({classes[0]!r}); a classifier needs at least two")
        y_index = np.searchsorted(classes, labels)
        dims = tuple(x.shape[1] for x in inputs)
        if eval_set is None:
            train_rows, val_rows = self._hold_out(y_index)
            val_inputs, val_index = [x[val_rows] for x in inputs], y_index[val_rows]
            inputs, y_index = [x[train_rows] for x in inputs], y_index[train_rows]
        else:
            if not isinstance(eval_set, (tuple, list)) or len(eval_set) != 2:
                raise ValueError("eval_set must be a pair (X_val, y_val)")
            val_inputs = modality_inputs(eval_set[0], modalities, dims, name="eval_set X", fitted=True)
            val_labels = check_labels(eval_set[1], len(val_inputs[0]), name="eval_set y")
            unseen = sorted(set(val_labels.tolist()) - set(classes.tolist()), key=str)
            if unseen:
                raise ValueError(f"eval_set y holds labels not in y: {', '.join(map(repr, unseen[:5]))}; "
                                 "validate on the classes the head is trained on")
            if not len(val_labels):
                raise ValueError("eval_set has 0 rows; pass validation rows, or leave eval_set out to hold out "
                                 "a part of X")
            val_index = np.searchsorted(classes, val_labels)
        config = HeadConfig(self.strategy, self._fusion(), dims, len(classes),
                            middle_dim=self.middle_dim, fusion_dim=self.fusion_dim, dropout=self.dropout)
        settings = TrainSettings(batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                                 max_epochs=self.max_epochs, patience=self.patience, precision=self.precision)
        device = resolve_device(self.device)

        def split(xs, index):
            return Split([torch.from_numpy(x).to(device) for x in xs],
                         torch.as_tensor(index, dtype=torch.int64).to(device))

        # the estimator needs no test split: score() any split afterwards
        result = train_heads(config, [self.seed], HeadData(split(inputs, y_index), split(val_inputs, val_index),
                                                           None), settings)[0]
        self._set_trained(config, result.params, classes)
        self.best_val_accuracy_, self.best_epoch_, self.n_epochs_ = (result.best_val_accuracy, result.best_epoch,
                                                                     result.epochs_run)
        return self

    def _modalities(self) -> tuple[str, ...]:
        heads = list_strategies(trainer="head")
        if self.strategy not in heads:
            raise ValueError(f"unknown strategy {self.strategy!r}; use one of {', '.join(heads)}")
        return get_strategy(self.strategy).modalities

    def _fusion(self) -> str | None:
        if not get_strategy(self.strategy).fused:
            return self.fusion  # HeadConfig refuses an operator for a baseline
        return self.fusion or "concat"

    def _hold_out(self, y_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}; or pass "
                             "eval_set=(X_val, y_val)")
        rows = np.arange(len(y_index))
        if len(rows) < 2:
            raise ValueError(f"cannot hold out a validation part of {len(rows)} row(s); pass more rows or "
                             "eval_set=(X_val, y_val)")
        n_val = min(max(1, round(self.validation_fraction * len(rows))), len(rows) - 1)
        counts = np.bincount(y_index)
        # stratified when every class can give one row to each part; else (a few rows) a plain seeded draw
        stratify = y_index if counts.min() >= 2 and len(counts) <= min(n_val, len(rows) - n_val) else None
        return train_test_split(rows, test_size=n_val, random_state=self.seed, stratify=stratify)

    def _set_trained(self, config: HeadConfig, params: dict[str, torch.Tensor], classes) -> None:
        classes = np.asarray(classes)
        if len(classes) != config.num_classes:
            raise ValueError(f"{len(classes)} class labels for a head with {config.num_classes} outputs")
        expected = StackedHead(config).param_shapes()
        shapes = {k: tuple(v.shape[1:]) for k, v in params.items()}
        if shapes != expected:
            differ = sorted(k for k in expected.keys() | shapes.keys() if expected.get(k) != shapes.get(k))
            raise ValueError(f"the weights do not fit a {config.cell} head of input widths {config.input_dims}: "
                             f"{', '.join(differ[:4])} differ")
        self.config_, self.params_, self.classes_ = config, params, classes
        self.input_widths_ = self.input_dims_ = tuple(config.input_dims)  # input_dims_: the older name
        self.n_features_in_ = int(sum(config.input_dims))

    @classmethod
    def from_trained(cls, config: HeadConfig, params: dict[str, torch.Tensor], classes, *,
                     seed: int = 0) -> "FusionHead":
        """A fitted estimator around weights trained elsewhere (a sweep's train_heads result, (1, ...) each)."""
        head = cls(config.strategy, config.fusion, input_widths=tuple(config.input_dims), seed=seed,
                   dropout=config.dropout, middle_dim=config.middle_dim, fusion_dim=config.fusion_dim)
        head._set_trained(config, params, classes)
        return head

    # ------------------------------------------------------------------------------------------- predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "params_"):
            raise NotFittedError("this FusionHead is not fitted yet; call fit(X, y) first, or load one with "
                                 "FusionHead.from_pretrained(folder)")

    def predict_proba(self, X) -> np.ndarray:
        """(n, C) class probabilities, columns in classes_ order."""
        self._check_fitted()
        inputs = modality_inputs(X, get_strategy(self.config_.strategy).modalities, self.input_widths_, name="X",
                                  fitted=True)
        if not len(inputs[0]):
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        with torch_threads(self.num_threads):
            logits = predict_logits(StackedHead(self.config_), self.params_,
                                    [torch.from_numpy(x) for x in inputs])[0]
            return torch.softmax(logits.float(), dim=-1).numpy()  # (n, C)

    def predict(self, X) -> np.ndarray:
        """(n,) predicted labels, as given to fit."""
        probabilities = self.predict_proba(X)  # (n, C); checks that the head is fitted
        return self.classes_[probabilities.argmax(axis=1)]

    # ------------------------------------------------------------------------------------------- folders

    def save_pretrained(self, folder: str | os.PathLike, *, metadata: dict | None = None):
        """model.safetensors + config.json (the HeadConfig, classes, seed, estimator settings, `metadata`)."""
        self._check_fitted()
        params = self.get_params()
        if params["input_widths"] is not None:  # JSON-able (a numpy integer is not)
            params["input_widths"] = [int(w) for w in np.atleast_1d(params["input_widths"])]
        doc = {"config": self.config_.to_dict(), "seed": self.seed, "classes": self.classes_.tolist(),
               "estimator": params, "weight_layout": "linear weights are (in, out): y = x @ W + b"}
        clash = sorted(set(doc) & set(metadata or {}))
        if clash:
            raise ValueError(f"metadata may not set {', '.join(clash)}: the head writes them")
        return save_pretrained(folder, {k: v[0] for k, v in self.params_.items()}, {**doc, **(metadata or {})},
                               kind=KIND)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "FusionHead":
        """A fitted head from a folder written by save_pretrained (or by `heads sweep`, old folders too);
        its whole config.json is `metadata_`."""
        tensors, doc = load_pretrained(folder, kind=KIND)
        try:
            config = HeadConfig.from_dict(doc["config"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{folder}/config.json holds no valid head config ({error}); save the head again") \
                from None
        known = cls().get_params()
        recorded = {k: v for k, v in (doc.get("estimator") or {}).items() if k in known}
        if "input_widths" not in recorded:  # folders written before the parameter: the widths it was fitted on
            recorded["input_widths"] = tuple(config.input_dims)
        elif isinstance(recorded["input_widths"], list):  # JSON has no tuples
            recorded["input_widths"] = tuple(recorded["input_widths"])
        head = cls(**recorded)
        head.set_params(strategy=config.strategy, fusion=config.fusion, seed=doc.get("seed", 0),
                        dropout=config.dropout, middle_dim=config.middle_dim, fusion_dim=config.fusion_dim)
        head._set_trained(config, {k: v.unsqueeze(0) for k, v in tensors.items()},
                          doc.get("classes") or np.arange(config.num_classes))
        head.metadata_ = doc
        return head


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's intra-op thread count set to `count` for the block (None: unchanged), the caller's restored after."""
    if count is None:
        yield
        return
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ValueError(f"num_threads must be an integer of at least 1 (or None: torch's setting), got {count!r}")
    before = torch.get_num_threads()
    if before != count:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class FeatureMatrices(NamedTuple):
    """A store's splits as FusionHead inputs: each split an (X (n, sum(input_widths)), y (n,) class names) pair."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    input_widths: tuple[int, ...]  # one per named feature set, in the order named
    names: tuple[str, ...]


def feature_matrices(store, names) -> FeatureMatrices:
    """The named feature sets of `store` (e.g. heads.inputs_for(store, "2A"), image first) side by side, per
    split, over the rows ok in every named set (as store.load):

        data = feature_matrices(store, inputs_for(store, "2A"))
        FusionHead("2A", input_widths=data.input_widths).fit(*data.train, eval_set=data.val).score(*data.test)
    """
    names = [names] if isinstance(names, str) else list(names)
    loaded = store.load(names)
    class_names = np.asarray(store.classes)
    splits = {}
    for split in ("train", "val", "test"):
        rows = loaded.split == split
        splits[split] = (np.concatenate([loaded.features[n][rows] for n in names], axis=1),  # (n, sum D)
                         class_names[loaded.labels[rows]])
    return FeatureMatrices(**splits, input_widths=tuple(loaded.features[n].shape[1] for n in names),
                           names=tuple(names))
