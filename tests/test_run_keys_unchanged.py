"""Proof that the redesigns kept the run keys: every row committed in benchmarks/results gets the key it was
written with when today's code computes it from the row's own config, training settings, seed, manifest and
feature-set provenance, so a sweep rerun over those results folders skips every cell instead of training again.

benchmarks/results/sweep/ is the exception, and was already on main 4b172ae (checked there with the same
computation: the same 66 rows differ): its rows predate TrainSettings' `class_weight` and had their module paths
rewritten after they were written, so they would train again. They are counted here, not hidden."""
import json
from dataclasses import fields
from pathlib import Path

import pytest

from heads.models import HeadConfig
from heads.sweep import run_key
from heads.train import TrainSettings

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
ALL_ROWS = [(path, json.loads(line)) for path in sorted(RESULTS.rglob("runs.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]
TODAYS_FIELDS = {f.name for f in fields(TrainSettings)}
ROWS = [(p, r) for p, r in ALL_ROWS if set(r["train_settings"]) == TODAYS_FIELDS]   # made with today's settings


def test_the_committed_results_are_there():
    assert len(ROWS) >= 80 and {row["strategy"] for _, row in ROWS} >= {"2A", "2B", "image", "text"}
    older = [(p.parent.name, r["cell"]) for p, r in ALL_ROWS if set(r["train_settings"]) != TODAYS_FIELDS]
    assert len(older) == 66 and {folder for folder, _ in older} == {"sweep"}   # the documented exception


@pytest.mark.parametrize("path,row", ROWS, ids=[f"{p.parent.name}:{r['cell']}:{r['seed']}" for p, r in ROWS])
def test_todays_code_computes_the_committed_run_key(path, row):
    key = run_key(HeadConfig.from_dict(row["config"]), TrainSettings(**row["train_settings"]), row["seed"],
                  row["store"]["manifest_sha256"], row["store"]["feature_sets"], row.get("data_access"))
    assert key == row["run_key"]
