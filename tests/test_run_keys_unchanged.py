"""Proof that the redesigns kept the run keys: every row committed in benchmarks/results (heads and decision-level
models) gets the key it was written with when today's code (heads/rows.py run_key) computes it from the row's own
config, training settings, seed, manifest and feature-set provenance, so a sweep rerun over those results folders
skips every cell instead of training again.

benchmarks/results/sweep/ is the exception, and was already on main 4b172ae (checked there with the same
computation: the same 66 rows differ): its rows predate TrainSettings' `class_weight` and had their module paths
rewritten after they were written, so they would train again. So are the 66 rows of benchmarks/results/paper/rows
that read fine-tuned modules' features (1A, 1B, LFM; also on 4b172ae): their provenance's `module_dir` was made
relative when they were committed (the keys were computed with the absolute folder of the machine that ran them).
They are counted here, not hidden."""
import dataclasses
import json
from dataclasses import fields
from pathlib import Path

import pytest

from heads.decision import LinearSettings
from heads.models import HeadConfig
from heads.rows import run_key
from heads.strategies import get_strategy, registered
from heads.train import TrainSettings

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
ALL_ROWS = [(path, json.loads(line)) for path in sorted(RESULTS.rglob("*runs.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]
TODAYS_FIELDS = {f.name for f in fields(TrainSettings)}


def _module_dir_rewritten(row: dict) -> bool:
    return any("module_dir" in p for p in row["store"]["feature_sets"].values())


KEPT = [(p, r) for p, r in ALL_ROWS if not _module_dir_rewritten(r)]
ROWS = [(p, r) for p, r in KEPT if set(r["train_settings"]) == TODAYS_FIELDS]   # heads made with today's settings
LINEAR = {s.name for s in registered() if s.trainer == "linear"}
LINEAR_ROWS = [(p, r) for p, r in KEPT if r["strategy"] in LINEAR]


def test_the_committed_results_are_there():
    assert len(ROWS) >= 80 and {row["strategy"] for _, row in ROWS} >= {"2A", "2B", "image", "text"}
    older = [(p.parent.name, r["cell"]) for p, r in ALL_ROWS if set(r["train_settings"]) != TODAYS_FIELDS
             and r["strategy"] not in LINEAR and r["strategy"] != "ensemble"]
    assert len(older) == 66 and {folder for folder, _ in older} == {"sweep"}   # the documented exceptions
    rewritten = [(p.parent.name, r) for p, r in ALL_ROWS if _module_dir_rewritten(r) and p.parent.name != "sweep"]
    assert len(rewritten) == 66 and {folder for folder, _ in rewritten} == {"rows"}
    assert {r["strategy"] for _, r in rewritten} == {"1A", "1B", "LFM"}
    assert all(not p["module_dir"].startswith("/") for _, r in rewritten for p in r["store"]["feature_sets"].values())


@pytest.mark.parametrize("path,row", ROWS, ids=[f"{p.parent.name}:{r['cell']}:{r['seed']}" for p, r in ROWS])
def test_todays_code_computes_the_committed_run_key(path, row):
    config = HeadConfig.from_dict(row["config"]).to_dict()
    train = dataclasses.asdict(TrainSettings(**row["train_settings"]))
    key = run_key(config=config, train=train, seed=row["seed"], manifest_sha256=row["store"]["manifest_sha256"],
                  feature_sets=row["store"]["feature_sets"], access=row.get("data_access"))
    assert key == row["run_key"]


def test_the_committed_decision_level_rows_are_there():
    assert {r["strategy"] for _, r in LINEAR_ROWS} >= {"LR-image", "LR-text", "LR-concat", "LF", "ST"}


@pytest.mark.parametrize("path,row", LINEAR_ROWS, ids=[f"{p.parent.name}:{r['cell']}:{r['seed']}" for p, r in LINEAR_ROWS])
def test_todays_code_computes_the_committed_decision_run_key(path, row):
    """Decision-level rows written before the solver was a setting were made by scikit-learn; their settings
    resolve to the same `train` part (LinearSettings.to_dict leaves "sklearn" out)."""
    assert get_strategy(row["strategy"]).trainer == "linear"
    train = LinearSettings(**{"solver": "sklearn", **row["train_settings"]}).to_dict()
    key = run_key(config=row["config"], train=train, seed=row["seed"], manifest_sha256=row["store"]["manifest_sha256"],
                  feature_sets=row["store"]["feature_sets"])
    assert key == row["run_key"]
