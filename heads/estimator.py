"""`FusionHead`: one fusion head as a scikit-learn estimator, for notebooks.

    head = FusionHead("2A", "concat").fit([X_img, X_txt], y, eval_set=([V_img, V_txt], y_val))
    head.predict([X_img, X_txt]); head.predict_proba(...); head.score(Xs, y); head.classes_
    head.save_pretrained(folder); FusionHead.from_pretrained(folder)

`fit` is the sweep's training code (heads.train.train_heads with one seed), not a loop of its own. Input widths
and classes come from the data; labels may be strings (`classes_` is sorted like numpy.unique, and `predict`
returns the original labels). Bad input is a one-line ValueError naming the input and the fix, not a torch error.
Saved with the model-folder convention (embedstore/model_folder.py, kind "fusion-head").
"""
from __future__ import annotations

import os

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError  # a ValueError (and an AttributeError), as sklearn raises it
from sklearn.model_selection import train_test_split

from embedstore.model_folder import load_pretrained, save_pretrained
from heads.models import HeadConfig, StackedHead, predict_logits
from heads.strategies import get_strategy, list_strategies
from embedstore.defaults import resolve_device
from heads.train import HeadData, Split, TrainSettings, train_heads

KIND = "fusion-head"


class FusionHead(ClassifierMixin, BaseEstimator):
    """One fusion head (strategy 1A/1B/2A/2B, or the "image"/"text" baseline) over precomputed features.

    X is a list of (n, D_m) arrays, one per modality, image first (a single array for a baseline).
    fusion=None means "concat" for the multimodal strategies (baselines take none). Without `eval_set`, a
    stratified `validation_fraction` of the training rows is held out for early stopping.
    Learned: classes_, input_dims_, config_ (a HeadConfig), params_ (the weights), best_val_accuracy_,
    best_epoch_, n_epochs_.
    """

    def __init__(self, strategy: str = "2A", fusion: str | None = None, *, seed: int = 0,
                 validation_fraction: float = 0.15, batch_size: int = 128, lr: float = 1e-3,
                 weight_decay: float = 0.01, max_epochs: int = 40, patience: int = 5, precision: str = "auto",
                 dropout: float = 0.3, middle_dim: int = 500, fusion_dim: int = 250, device: str | None = None):
        self.strategy, self.fusion, self.seed = strategy, fusion, seed
        self.validation_fraction = validation_fraction
        self.batch_size, self.lr, self.weight_decay = batch_size, lr, weight_decay
        self.max_epochs, self.patience, self.precision = max_epochs, patience, precision
        self.dropout, self.middle_dim, self.fusion_dim, self.device = dropout, middle_dim, fusion_dim, device

    # ------------------------------------------------------------------------------------------- fit

    def fit(self, X, y, *, eval_set=None) -> "FusionHead":
        """Train on X, y; early stopping on eval_set = (X_val, y_val), or on a held-out part of X, y."""

        modalities = self._modalities()
        inputs = _check_inputs(X, modalities, name="X")
        labels = _check_labels(y, len(inputs[0]), name="y")
        try:
            classes = np.unique(labels)
        except TypeError:
            raise ValueError("y mixes label types (e.g. numbers and strings); use one type") from None
        if len(classes) < 2:
            raise ValueError(f"y holds one class ({classes[0]!r}); a classifier needs at least two")
        y_index = np.searchsorted(classes, labels)
        if eval_set is None:
            train_rows, val_rows = self._hold_out(y_index)
            val_inputs, val_index = [x[val_rows] for x in inputs], y_index[val_rows]
            inputs, y_index = [x[train_rows] for x in inputs], y_index[train_rows]
        else:
            if not isinstance(eval_set, (tuple, list)) or len(eval_set) != 2:
                raise ValueError("eval_set must be a pair (X_val, y_val)")
            val_inputs = _check_inputs(eval_set[0], modalities, name="eval_set X",
                                       dims=tuple(x.shape[1] for x in inputs))
            val_labels = _check_labels(eval_set[1], len(val_inputs[0]), name="eval_set y")
            unseen = sorted(set(val_labels.tolist()) - set(classes.tolist()), key=str)
            if unseen:
                raise ValueError(f"eval_set y holds labels not in y: {', '.join(map(repr, unseen[:5]))}; "
                                 "validate on the classes the head is trained on")
            val_index = np.searchsorted(classes, val_labels)
        config = HeadConfig(self.strategy, self._fusion(), tuple(x.shape[1] for x in inputs), len(classes),
                            middle_dim=self.middle_dim, fusion_dim=self.fusion_dim, dropout=self.dropout)
        settings = TrainSettings(batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                                 max_epochs=self.max_epochs, patience=self.patience, precision=self.precision)
        device = resolve_device(self.device)

        def split(xs, index):
            return Split([torch.as_tensor(x).to(device) for x in xs], torch.as_tensor(index, dtype=torch.int64).to(device))

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
        counts = np.bincount(y_index)
        stratify = y_index if counts.min() >= 2 else None  # stratified when every class can give one row
        try:
            return train_test_split(rows, test_size=self.validation_fraction, random_state=self.seed,
                                    stratify=stratify)
        except ValueError as error:
            raise ValueError(f"cannot hold out a validation part of {len(rows)} rows ({error}); pass "
                             "eval_set=(X_val, y_val)") from None

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
        self.input_dims_ = config.input_dims

    @classmethod
    def from_trained(cls, config: HeadConfig, params: dict[str, torch.Tensor], classes, *,
                     seed: int = 0) -> "FusionHead":
        """A fitted estimator around weights trained elsewhere (a sweep's train_heads result, (1, ...) each)."""
        head = cls(config.strategy, config.fusion, seed=seed, dropout=config.dropout, middle_dim=config.middle_dim,
                   fusion_dim=config.fusion_dim)
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
        inputs = _check_inputs(X, get_strategy(self.config_.strategy).modalities, name="X", dims=self.input_dims_)
        if not len(inputs[0]):
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        logits = predict_logits(StackedHead(self.config_), self.params_, [torch.from_numpy(x) for x in inputs])[0]
        return torch.softmax(logits.float(), dim=-1).numpy()  # (n, C)

    def predict(self, X) -> np.ndarray:
        """(n,) predicted labels, as given to fit."""
        probabilities = self.predict_proba(X)  # (n, C); checks that the head is fitted
        return self.classes_[probabilities.argmax(axis=1)]

    # ------------------------------------------------------------------------------------------- folders

    def save_pretrained(self, folder: str | os.PathLike, *, metadata: dict | None = None):
        """model.safetensors + config.json (the HeadConfig, classes, seed, estimator settings, `metadata`)."""
        self._check_fitted()
        doc = {"config": self.config_.to_dict(), "seed": self.seed, "classes": self.classes_.tolist(),
               "estimator": self.get_params(), "weight_layout": "linear weights are (in, out): y = x @ W + b"}
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
        head = cls(**{k: v for k, v in (doc.get("estimator") or {}).items() if k in known})
        head.set_params(strategy=config.strategy, fusion=config.fusion, seed=doc.get("seed", 0),
                        dropout=config.dropout, middle_dim=config.middle_dim, fusion_dim=config.fusion_dim)
        head._set_trained(config, {k: v.unsqueeze(0) for k, v in tensors.items()},
                          doc.get("classes") or np.arange(config.num_classes))
        head.metadata_ = doc
        return head


def _check_inputs(X, modalities: tuple[str, ...], *, name: str, dims: tuple[int, ...] | None = None) -> list:
    """X as float32 (n, D_m) arrays, one per modality, or a one-line ValueError saying what is wrong."""
    if not isinstance(X, (list, tuple)):
        X = [X]
    if len(X) != len(modalities):
        wanted = ", ".join(f"X_{m}" for m in modalities)
        raise ValueError(f"{name}: this head takes {len(modalities)} input(s) ({', '.join(modalities)}), got "
                         f"{len(X)}; pass [{wanted}]")
    arrays = []
    for i, (x, modality) in enumerate(zip(X, modalities)):
        label = f"{name}[{i}] ({modality})"
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().float().numpy()
        try:
            array = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{label} is not numeric; pass feature arrays (e.g. from store.arrays)") from None
        if array.ndim != 2:
            raise ValueError(f"{label} must be 2-D (rows, features), got shape {array.shape}")
        if dims is not None and array.shape[1] != dims[i]:
            raise ValueError(f"{label} has {array.shape[1]} features per row, but the head was fitted on "
                             f"{dims[i]}; pass the same feature set it was trained on")
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise ValueError(f"{label} holds NaN or infinite values in {int(bad.sum())} row(s) (first: row "
                             f"{int(np.flatnonzero(bad)[0])}); drop or impute those rows")
        arrays.append(array)
    rows = [len(a) for a in arrays]
    if len(set(rows)) > 1:
        raise ValueError(f"{name}: the inputs have {' vs '.join(map(str, rows))} rows; row i must be the same "
                         "product in every input")
    return arrays


def _check_labels(y, n_rows: int, *, name: str) -> np.ndarray:
    labels = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row), got shape {labels.shape}")
    if len(labels) != n_rows:
        raise ValueError(f"{name} has {len(labels)} labels for {n_rows} rows of features")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ValueError(f"{name} holds NaN labels; drop those rows")
    if labels.dtype == object:
        try:
            labels = labels.astype(str) if all(isinstance(v, str) for v in labels) else labels.astype(np.int64)
        except (TypeError, ValueError):
            raise ValueError(f"{name} mixes label types (e.g. numbers and strings); use one type") from None
    return labels
