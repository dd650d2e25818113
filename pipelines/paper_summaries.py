"""`embed paper`'s runs, summarized for its report: module and head runs read from what the steps wrote (the
modules' metrics.json, the sweeps' runs.jsonl, the ensembles' rows), one summary per group over every (manifest
seed, seed) run and per manifest seed, and the best module / multimodal model among the summaries.

Summaries are dicts keyed by group name: "image S2" (modules), "2A-concat", "LF", "LR-text", "ensemble" (heads and
models over the store), "1A-concat (cross-fit)", "LFM (cross-fit)" (runs over cross-fitted modules: a results
folder whose plan entry has a "variant"); pipelines/paper_targets.py chooses among them. Validation accuracy is
averaged over the tuning manifests only: nothing is chosen on a check manifest.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from heads.results import read_runs
from heads.strategies import get_strategy
from heads.tables import mean_std
from pipelines.paper_targets import CROSS_FIT, ENSEMBLE, choose_multimodal, operator_strategies


def collect(plan: dict) -> tuple[list[dict], list[dict]]:
    """(module runs, head runs) as flat rows with their manifest seed; head rows limited to the plan's grid."""
    modules, heads = [], []
    for entry in plan["manifests"]:
        for m in entry["modules"]:
            metrics = json.loads((Path(m["dir"]) / "metrics.json").read_text())
            modules.append({"group": f"{m['modality']} S{m['strategy']}", "modality": m["modality"],
                            "strategy": m["strategy"], "manifest_seed": entry["seed"], "seed": m["seed"],
                            "test_accuracy": metrics["test_accuracy"], "test_macro_f1": metrics["test_macro_f1"],
                            "val_accuracy": metrics["best_val_accuracy"], "train_seconds": metrics["training_seconds"],
                            "epochs": metrics["epochs"], "trainable": metrics["trainable_parameters"],
                            "non_trainable": metrics["non_trainable_parameters"]})
        for r in entry["results"]:
            for row in read_runs(r["dir"]):
                # a sweep dir keeps runs of seeds/operators no longer asked for; report the plan's grid only
                if row["seed"] not in r["seeds"] or (row["fusion"] and row["fusion"] not in r["fusions"]):
                    continue
                # runs over cross-fitted modules: their own group, beside the plain one of the same cell
                group = row["cell"] + (CROSS_FIT if r.get("variant") else "")
                heads.append({"group": group, "cell": row["cell"], "strategy": row["strategy"], "fusion": row["fusion"],
                              "manifest_seed": entry["seed"], "seed": row["seed"], "results_dir": r["dir"],
                              "test_accuracy": row["test_accuracy"], "test_macro_f1": row["test_macro_f1"],
                              "val_accuracy": row["best_val_accuracy"], "train_seconds": row["train_seconds"],
                              "epochs": row["epochs_run"], "trainable": row["trainable_parameters"],
                              "non_trainable": row["non_trainable_parameters"]})
        if entry.get("ensembles") and Path(entry["ensembles"]).exists():
            rows = read_runs(Path(entry["ensembles"]).parent, Path(entry["ensembles"]).name)
            if rows:  # the newest: the ensemble over the runs as they are now
                row = rows[-1]
                heads.append({"group": ENSEMBLE, "strategy": ENSEMBLE, "fusion": None,
                              "manifest_seed": entry["seed"], "seed": None, "results_dir": None,
                              "test_accuracy": row["test_accuracy"], "test_macro_f1": row["test_macro_f1"],
                              "val_accuracy": row["val_accuracy"], "train_seconds": row["seconds"], "epochs": None,
                              "trainable": 0, "non_trainable": 0})
    return modules, heads


def summarize(rows: list[dict], name: str, tuning: list[int] | None = None) -> dict:
    """Mean and std over every run, and per manifest seed; validation accuracy over the `tuning` manifests' runs
    only (None: every manifest's), so that no choice by it looks at a check manifest."""
    def stat(key, of=rows):  # None: not applicable (a regression has no epochs)
        return mean_std([r[key] for r in of if r[key] is not None])

    tuned = [r for r in rows if tuning is None or r["manifest_seed"] in tuning] or rows

    per_manifest, per_manifest_val = {}, {}
    for m in sorted({r["manifest_seed"] for r in rows}):
        acc = [r["test_accuracy"] for r in rows if r["manifest_seed"] == m]
        per_manifest[m] = (*mean_std(acc), len(acc))
        per_manifest_val[m] = float(np.mean([r["val_accuracy"] for r in rows if r["manifest_seed"] == m]))
    (acc, acc_std), (f1, f1_std), (secs, secs_std) = stat("test_accuracy"), stat("test_macro_f1"), stat("train_seconds")
    return {"cell": name, "runs": len(rows), "accuracy_mean": acc, "accuracy_std": acc_std, "macro_f1_mean": f1,
            "macro_f1_std": f1_std, "train_seconds_mean": secs, "train_seconds_std": secs_std,
            "val_accuracy_mean": stat("val_accuracy", tuned)[0], "epochs_mean": stat("epochs")[0],
            "trainable": rows[0]["trainable"], "non_trainable": rows[0]["non_trainable"], "per_manifest": per_manifest,
            "per_manifest_val": per_manifest_val, "strategy": rows[0].get("strategy")}


def groups(rows: list[dict], tuning: list[int] | None = None) -> dict[str, dict]:
    """group name -> its summary, in the order the groups first appear (validation over `tuning` manifests)."""
    names = list(dict.fromkeys(r["group"] for r in rows))
    return {n: summarize([r for r in rows if r["group"] == n], n, tuning) for n in names}


def manifest_roles(plan: dict) -> tuple[list[int], list[int]]:
    """(tuning manifest seeds, check manifest seeds) in plan order; a plan written before check manifests has
    tuning ones only."""
    roles = [(e["seed"], e.get("role", "tuning")) for e in plan["manifests"]]
    return [m for m, r in roles if r == "tuning"], [m for m, r in roles if r == "check"]


def cached_strategies() -> tuple[str, ...]:
    """The multimodal strategies with a fusion operator trained over the store (1-A, 1-B, 2-A, 2-B)."""
    return tuple(s for s in operator_strategies() if get_strategy(s).over_store)


def best_module(modules: dict, modality: str) -> dict | None:
    mine = [c for k, c in modules.items() if k.startswith(f"{modality} S")]
    return max(mine, key=lambda c: c["accuracy_mean"]) if mine else None


def best_multimodal(heads: dict, cached_only: bool = False, choice_manifest: int | None = None) -> dict | None:
    """The best multimodal model by validation accuracy on the choice manifest (pipelines/paper_targets.py);
    `cached_only`: among the fusion heads over the store (1-A, 1-B, 2-A, 2-B) only."""
    pool = [c for k, c in heads.items() if k.split("-")[0] in cached_strategies()] if cached_only else None
    return choose_multimodal(heads, choice_manifest, pool=pool)

