"""The best model of each sweep cell, saved in RESULTS/heads/<cell>/ (`heads predict` and `heads ensemble` load it).

One rule for every trainer: the cell's best seed by validation (heads/selection.py; diverged heads are never
saved) replaces the saved model only when it beats it on validation, for the same store, config and settings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from heads.selection import best_by_validation


def head_folder(out_dir: Path, cell) -> Path:
    """RESULTS/heads/<cell>, or RESULTS/heads/<pair>/<cell> in a sweep of several backbone pairs."""
    return out_dir / "heads" / (f"{cell.pair_name}/{cell.base_name}" if cell.named_pair else cell.base_name)


def head_store_path(head_dir: str | Path, metadata: dict) -> Path:
    """The store a saved head was trained on: its recorded path, relative to the head's folder (or absolute,
    in heads saved before paths became relative)."""
    return Path(head_dir) / metadata["store"]["path"]


def saved_is_at_least_as_good(directory: str | os.PathLike, identity: dict, val_accuracy: float) -> bool:
    """True when `directory` already holds a model saved with this `identity` (store, config, training settings:
    the keys compared) whose recorded validation accuracy is at least `val_accuracy`: then a sweep keeps it
    rather than saving a new seed's model over it."""
    path = Path(directory) / "config.json"
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    now = json.loads(json.dumps(identity))  # tuples -> lists, as saved
    return all(saved.get(k) == v for k, v in now.items()) and saved.get("best_val_accuracy", -1) >= val_accuracy


def save_best(out_dir: Path, directory: Path, rows: list[dict], save: Callable[[int, dict], None], *,
              recorded: tuple[str, ...] = ()) -> bool:
    """Save the model of `rows`' best seed by validation (ties: the lower seed) with `save(i, metadata)` unless
    `directory` already holds one of the same store, config and settings at least as good; True if it saved.
    The metadata names the store relative to `directory` (a results folder moved with its store still works),
    and copies the row's `recorded` fields besides the shared ones."""
    candidates = [j for j, row in enumerate(rows) if not row["diverged"]]
    if not candidates:
        return False
    i = best_by_validation(candidates, val=lambda j: rows[j]["best_val_accuracy"], name=lambda j: rows[j]["seed"])
    row = rows[i]
    store = {**row["store"], "path": os.path.relpath(Path(out_dir) / row["store"]["path"], directory)}
    identity = {"store": store, "config": row["config"], "train_settings": row["train_settings"]}
    if saved_is_at_least_as_good(directory, identity, row["best_val_accuracy"]):
        return False
    save(i, {"store": store, "run_key": row["run_key"], "train_settings": row["train_settings"],
             "best_val_accuracy": row["best_val_accuracy"], "test_accuracy": row["test_accuracy"],
             "test_macro_f1": row["test_macro_f1"], **{k: row[k] for k in recorded},
             "inputs": list(row["store"]["feature_sets"])})
    return True
