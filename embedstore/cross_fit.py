"""Cross-fitted modules (`embed finetune --cross-fit K`): out-of-fold module features for the training rows.

Why: strategies 1-A / 1-B fuse a module's `dense` and `classifier` outputs. A module's outputs on the items it
was trained on are over-confident, so a fusion head trained on them learns from features unlike the ones it
meets on validation and test. Cross-fitting: the training items are dealt into K stratified folds (seeded);
fold module k is trained on the training items outside fold k, and a training row's features come from the
fold module that never saw it. Validation and test rows (and new products in `heads predict`) use the usual
module trained on every training item.

One module folder holds it all, so everything that takes a module folder keeps working:

    DIR/model.safetensors, config.json, metrics.json   the full module (as without --cross-fit)
    DIR/folds/fold-<k>/                                 fold module k (a module folder of its own)

DIR/config.json["cross_fit"] = {"k": K, "seed": s, "folds": {item id: fold}, "fold_module_ids": [...]}; the
fold modules' ids enter the full module's id (embedstore.modules.module_id), so its store source differs from
a plain module's. The full module is written last: a folder without "cross_fit" in its config is unfinished.
A fold whose config records this run's key is finished and kept when a run is repeated; an interrupted S3 fold
resumes from its checkpoint (the training loop's), an S1/S2 fold (seconds) is retrained.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from embedstore.fingerprint import fingerprint
from embedstore.model_folder import read_config

FOLDS_DIR = "folds"
# settings that do not change what a fold module learns (where it runs, how it reports)
_NOT_IDENTITY = ("device", "progress", "workers")
# settings added after fold keys were first written, with their default: left out while they have it, so folds
# finished before the setting existed are still found finished
_ADDED_LATER = {"image_resize": "crop"}


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2:
        raise ValueError(f"--cross-fit must be an integer of at least 2 (the number of folds), got {k!r}")
    return int(k)


def fold_dir(out_dir: str | Path, fold: int) -> Path:
    return Path(out_dir) / FOLDS_DIR / f"fold-{fold}"


def assign_folds(manifest, k: int, seed: int) -> dict[str, int]:
    """{training item id: fold in 0..k-1}, stratified by class and drawn from `seed` (the same manifest, k and
    seed always give the same folds). One-line ValueError when a class has fewer training items than folds."""
    k = check_k(k)
    train = manifest.items_in("train")
    counts: dict[str, int] = {}
    for item in train:
        counts[item.label] = counts.get(item.label, 0) + 1
    smallest = min(counts, key=lambda label: (counts[label], label)) if counts else None
    if smallest is None or counts[smallest] < k:
        have = f"class {smallest!r} has {counts[smallest]}" if smallest else "the manifest has none"
        # the suggestion must itself be accepted: K is at least 2, so a class of one training item allows none
        most = counts[smallest] if smallest else 0
        fix = (f"choose a K of at least 2 and at most {most}" if most >= 2 else
               "cross-fitting needs at least 2 training items in every class: train without --cross-fit, or "
               "prepare a manifest with more training items per class")
        raise ValueError(f"--cross-fit {k} needs at least {k} training items in every class, but {have}; {fix}")
    labels = np.array([item.label for item in train])
    folds = np.empty(len(train), dtype=np.int64)
    # imported here: scikit-learn costs ~1 s to import, and `embed extract` (which imports this module) rarely folds
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(train)), labels)):
        folds[held_out] = fold
    return {item.id: int(fold) for item, fold in zip(train, folds)}


def fold_key(settings, manifest_sha256: str, assignment: dict[str, int], fold: int) -> str:
    """What makes a finished fold module reusable: its training settings, the manifest, and its held-out items."""
    doc = {key: value for key, value in asdict(settings).items() if key not in _NOT_IDENTITY
           and not (key in _ADDED_LATER and value == _ADDED_LATER[key])}
    held_out = sorted(item for item, f in assignment.items() if f == fold)
    return fingerprint({"settings": doc, "manifest_sha256": manifest_sha256, "fold": fold, "held_out": held_out})


def finished_fold(folder: Path, key: str) -> bool:
    """True when `folder` holds a saved fold module made by the same run (same key)."""
    try:
        config = read_config(folder, kind="module")
    except (FileNotFoundError, ValueError):
        return False
    return (config.get("cross_fit_fold") or {}).get("key") == key


def finetune_cross_fitted(manifest, out_dir: Path, settings, train_one, backbone=None) -> dict:
    """Train K fold modules (keeping finished ones), then the full module; returns the full module's metrics.

    `train_one(out_dir, backbone, held_out: frozenset[str], extra: dict) -> metrics` trains and saves one module
    without the held-out training items (finetune.py's); `extra` goes into its config.json."""
    from embedstore.modules import module_id

    k = check_k(settings.cross_fit)
    assignment = assign_folds(manifest, k, settings.seed)  # refuses a bad K before anything is trained
    keys = [fold_key(settings, manifest.sha256, assignment, fold) for fold in range(k)]
    done = [finished_fold(fold_dir(out_dir, fold), keys[fold]) for fold in range(k)]  # decided once, every rank
    fold_metrics = []
    for fold in range(k):
        folder = fold_dir(out_dir, fold)
        if done[fold]:
            fold_metrics.append({"fold": fold, "kept": True, **_summary(read_config(folder, kind="module"))})
            continue
        held_out = frozenset(item for item, f in assignment.items() if f == fold)
        extra = {"cross_fit_fold": {"fold": fold, "k": k, "key": keys[fold], "held_out": len(held_out)}}
        metrics = train_one(folder, _fresh(backbone, settings), held_out, extra)
        fold_metrics.append({"fold": fold, "kept": False, **_summary({"metrics": metrics})})
    record = {"k": k, "seed": settings.seed, "folds": assignment,
              "fold_module_ids": [_fold_id(out_dir, fold, module_id) for fold in range(k)]}
    metrics = train_one(out_dir, _fresh(backbone, settings), frozenset(), {"cross_fit": record})
    metrics["cross_fit"] = {"k": k, "folds": fold_metrics}
    return metrics


def _fold_id(out_dir, fold, module_id) -> str:
    try:
        return module_id(fold_dir(out_dir, fold))
    except FileNotFoundError:  # torchrun ranks other than 0 write nothing
        return ""


def _fresh(backbone, settings):
    """S3 trains the backbone in place: every fold starts from the same untouched copy."""
    return copy.deepcopy(backbone) if backbone is not None and settings.strategy == 3 else backbone


def _summary(config: dict) -> dict:
    metrics = config.get("metrics") or {}
    return {key: metrics.get(key) for key in ("best_val_accuracy", "test_accuracy", "epochs", "items")}


# ----------------------------------------------------------------------------------------------- extraction


class RowPlan:
    """Which module computes each manifest row: for a cross-fitted module, a training row's fold module, every
    other row the full module; for a plain module, the module for every row."""

    def __init__(self, modules: list, row_module: np.ndarray, k: int | None):
        self.modules = modules        # [full, fold 0, ..., fold K-1]
        self.row_module = row_module  # (N,) index into modules
        self.k = k                    # None for a plain module

    @classmethod
    def build(cls, module, config: dict, module_dir: Path, manifest, device) -> "RowPlan":
        from embedstore.modules import load_module, module_id

        record = config.get("cross_fit")
        row_module = np.zeros(len(manifest.items), dtype=np.int64)
        if not record:
            return cls([module], row_module, None)
        row_module[:] = _row_folds(record, manifest, module_dir) + 1  # -1 (not a training row) -> the full module
        folds = []
        for fold, recorded in enumerate(record["fold_module_ids"]):
            folder = fold_dir(module_dir, fold)
            if not folder.is_dir() or module_id(folder) != recorded:
                raise ValueError(f"the fold module {folder} of cross-fitted module {module_dir} is missing or not the "
                                 f"one it was saved with (module id {recorded}); rerun `embed finetune --cross-fit "
                                 f"{record['k']}` with --out {module_dir}")
            folds.append(load_module(folder, device=device)[0])
        return cls([module, *folds], row_module, int(record["k"]))

    def run(self, inputs, rows: np.ndarray, forward) -> dict[str, torch.Tensor]:
        """`forward(module, inputs) -> {layer: (n, D)}` over `inputs` (n items of manifest `rows`), each row by
        its module; the outputs in the order of `rows`."""
        which = self.row_module[rows]  # (n,)
        if len(self.modules) == 1 or (which == which[0]).all():
            return forward(self.modules[int(which[0])], inputs)
        outputs = {}
        for index in np.unique(which):
            chosen = torch.from_numpy(np.flatnonzero(which == index))
            part = forward(self.modules[int(index)], _take(inputs, chosen))
            for layer, value in part.items():
                if layer not in outputs:
                    outputs[layer] = value.new_empty((len(rows), *value.shape[1:]))
                outputs[layer][chosen.to(value.device)] = value
        return outputs


def check_folds(config: dict, manifest, module_dir: Path) -> None:
    """One-line ValueError when a training item of `manifest` is in no fold (the manifest changed)."""
    if config.get("cross_fit"):
        _row_folds(config["cross_fit"], manifest, module_dir)


def _row_folds(record: dict, manifest, module_dir: Path) -> np.ndarray:
    """(N,) the fold of each training row, -1 for validation and test rows."""
    folds = record["folds"]
    out = np.full(len(manifest.items), -1, dtype=np.int64)
    for row, item in enumerate(manifest.items):
        if item.split != "train":
            continue
        if item.id not in folds:
            raise ValueError(f"training item {item.id!r} is in no fold of cross-fitted module {module_dir} (was the "
                             f"manifest changed?); retrain it with `embed finetune --cross-fit {record['k']}`")
        out[row] = folds[item.id]
    return out


def _take(inputs, index: torch.Tensor):
    if isinstance(inputs, dict):  # tokens: {name: (n, T)}
        return {key: value[index.to(value.device)] for key, value in inputs.items()}
    return inputs[index.to(inputs.device)]
