"""One result row and one run key for every kind of training: heads, decision-level models, end-to-end runs.

A sweep writes one row per trained model to RESULTS/runs.jsonl (heads/results.py). Every row carries the same
fields (`ROW_FIELDS`), built here by `result_row`, whatever trained it; a trainer adds its own extras beside them
(a decision model's `chosen`, an end-to-end run's `processes`). Reports, the ensemble and the closing summary
read only the shared fields. A row's `run_key` is its identity (`run_key`): a sweep skips a model whose key is
already in runs.jsonl, so the recipe may never change for rows already written.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from embedstore.fingerprint import fingerprint

# what every row holds, in the order they are written
ROW_FIELDS = (
    "run_key", "cell", "cell_base", "pair", "image_source", "text_source", "strategy", "fusion", "seed",
    "config", "train_settings", "store",
    "test_accuracy", "test_macro_f1", "best_val_accuracy", "best_epoch", "diverged", "epochs_run",
    "train_seconds", "group_seconds", "group_size", "batched", "device", "precision", "train_flops",
    "trainable_parameters", "non_trainable_parameters", "non_trainable_note", "created",
)


def run_key(*, train: dict, manifest_sha256: str, config: dict | None = None, seed: int | None = None,
            feature_sets: dict | None = None, access: dict | None = None, backbones: dict | None = None) -> str:
    """A run's identity: what it is (`config`), how it was fit (`train`: the settings' dict), its `seed`, its data
    (the manifest, and the provenance of the `feature_sets` it read) and, for a streamed split, how it was read
    (`access`, heads/streamed.py access_key; in-memory runs leave it out, so their keys are those of sweeps made
    before it was recorded).

    End-to-end runs read no cached features: they give `backbones` (weights id per modality) instead, and hold
    their config and seed inside `train`, the layout their first rows were written with (their keys stay)."""
    if backbones is not None:
        return fingerprint({"settings": train, "manifest_sha256": manifest_sha256, "backbones": backbones})
    doc = {"config": config, "train": train, "seed": seed, "manifest_sha256": manifest_sha256,
           "feature_sets": feature_sets}
    if access:
        doc["data_access"] = access
    return fingerprint(doc)


def cell_fields(cell) -> dict:
    """The naming fields of a row from a grid cell (heads/grid.py Cell)."""
    return {"cell": cell.name, "cell_base": cell.base_name, "pair": cell.pair_name, "image_source": cell.pair[0],
            "text_source": cell.pair[1], "strategy": cell.strategy, "fusion": cell.fusion}


def provenance(info) -> dict:
    """A feature set's provenance as rows and run keys record it (without its changing `complete` flag)."""
    return {k: v for k, v in info.provenance.items() if k != "complete"}


def store_doc(store, store_path: Path, out_dir: Path, feature_sets, counts: dict) -> dict:
    """The `store` field of a cell's rows: its path relative to the results folder, the manifest, the provenance
    of the feature sets the cell reads, and its row counts (`counts`)."""
    return {"path": os.path.relpath(store_path, out_dir), "manifest_sha256": store.manifest_sha256,
            "feature_sets": {n: provenance(store.feature_sets[n]) for n in feature_sets}, **counts}


def non_trainable(feature_sets: dict) -> tuple[int, str | None]:
    """The parameters behind the cached features (the backbones' and modules', from their provenance), and a note
    naming the sets that do not record them."""
    missing = [n for n, p in feature_sets.items() if "parameters" not in p]
    total = sum(int(p.get("parameters", 0)) for p in feature_sets.values())
    note = f"no 'parameters' in the provenance of {', '.join(missing)}; counted as 0" if missing else None
    return total, note


def result_row(*, run_key: str, names: dict, seed: int, config: dict, train_settings: dict, store: dict,
               test_accuracy: float, test_macro_f1: float, best_val_accuracy: float | None,
               best_epoch: int | None, epochs_run: int | None, diverged: bool,
               train_seconds: float, group_seconds: float, group_size: int, batched: bool,
               device: str, precision: str, train_flops: float | None,
               trainable_parameters: int, non_trainable_parameters: int, non_trainable_note: str | None = None,
               **extra) -> dict:
    """One row of runs.jsonl: every field of ROW_FIELDS (`names`: cell_fields, or an end-to-end run's own), then
    the trainer's `extra` fields."""
    missing = set(ROW_FIELDS[1:8]) - set(names)
    if missing:
        raise ValueError(f"a result row needs {', '.join(sorted(missing))}")
    row = {"run_key": run_key, **{k: names[k] for k in ROW_FIELDS[1:8]}, "seed": seed, "config": config,
           "train_settings": train_settings, "store": store,
           "test_accuracy": test_accuracy, "test_macro_f1": test_macro_f1, "best_val_accuracy": best_val_accuracy,
           "best_epoch": best_epoch, "diverged": diverged, "epochs_run": epochs_run,
           "train_seconds": train_seconds, "group_seconds": group_seconds, "group_size": group_size,
           "batched": batched, "device": device, "precision": precision, "train_flops": train_flops,
           "trainable_parameters": trainable_parameters, "non_trainable_parameters": non_trainable_parameters,
           "non_trainable_note": non_trainable_note, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    clash = set(extra) & set(row)
    if clash:
        raise ValueError(f"extra row fields {', '.join(sorted(clash))} are shared fields; pass them by name")
    return {**row, **extra}
