"""Choosing by K-fold cross-validation on train + val (heads/cv_select.py): `heads select` and `heads ensemble
--select cv:K` report the chosen model's validation, CV and test accuracy; bad K and unrefittable kinds refused."""
import json
from pathlib import Path

import numpy as np
import pytest

from cli.heads import heads
from heads.cv_select import Selection, assign_folds, cross_validate, inner_split, parse_select
from heads.ensemble import Member, ensemble
from heads.select import format_selection_table, select_model
from heads.sweep import SweepSettings, run_sweep
from heads.train import TrainSettings
from store_factory import make_feature_store
from tests.cli_helpers import invoke

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = TrainSettings(batch_size=32, max_epochs=4, patience=2, lr=3e-3)
A, B, T = "image/a/pooled", "image/b/pooled", "text/t/pooled"


def quiet(_):
    pass


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """4 classes x 30 train + val items, a joined image source (a,b) + text: 2A-concat, the baselines, LR-concat."""
    root = tmp_path_factory.mktemp("cv")
    store = make_feature_store(root / "s.h5", classes=4, per_split=(80, 40, 40), features={A: 12, B: 8, T: 6},
                               separation={A: 0.6, B: 0.6, T: 0.5}).path
    settings = SweepSettings(strategies=("2A", "image", "text", "LR-concat"), fusions=("concat",), seeds=(0,),
                             train=FAST, device="cpu", jobs=1, progress=False, image_sources=("a,b",))
    run_sweep(store, root / "r", settings, log=quiet)
    return root / "r"


def test_parse_select():
    assert parse_select("validation") == Selection() and parse_select(None) == Selection()
    assert parse_select("cv:5") == Selection("cv", 5) and parse_select(" CV:3 ").label == "cv:3"
    for bad, message in (("cv:1", "at least 2"), ("cv:x", "at least 2"), ("cv:", "at least 2"),
                         ("kfold", "'validation' or 'cv:K'")):
        with pytest.raises(ValueError, match=message):
            parse_select(bad)


def test_folds_are_stratified_and_refuse_too_few_items():
    labels = np.repeat(np.arange(3), [5, 7, 10])
    fold_of = assign_folds(labels, 5, 0, ["x", "y", "z"])
    for c in range(3):   # every class in every fold, sizes within one
        sizes = np.bincount(fold_of[labels == c], minlength=5)
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    assert np.array_equal(fold_of, assign_folds(labels, 5, 0, ["x", "y", "z"]))   # seeded
    split = inner_split(labels, fold_of, 2, 0.125, 0)
    assert set(split[fold_of == 2]) == {"test"} and "test" not in set(split[fold_of != 2])
    for c in range(3):
        assert (split[labels == c] == "val").sum() >= 1 and (split[labels == c] == "train").sum() >= 1
    with pytest.raises(ValueError, match=r"cv:6 needs at least 6 train \+ val items of every class; class 'x' has 5"):
        assign_folds(labels, 6, 0, ["x", "y", "z"])


def test_select_reports_validation_cv_and_test(swept):
    doc = select_model([swept], "cv:3", log=quiet)
    assert doc["items"] == 120 and len(doc["candidates"]) == 4
    cvs = [c["cv_accuracy"] for c in doc["candidates"]]
    assert cvs == sorted(cvs, reverse=True) and doc["by_cv"] == doc["candidates"][0]
    best_val = max(c["val_accuracy"] for c in doc["candidates"])
    assert doc["by_validation"]["val_accuracy"] == best_val
    for c in doc["candidates"]:
        recorded = json.loads((swept / "heads" / c["member"].removeprefix("heads/") / "config.json").read_text())
        assert c["test_accuracy"] == recorded["test_accuracy"] and len(c["cv_fold_accuracies"]) == 3
        assert 0 <= c["cv_accuracy"] <= 1 and c["refit_seconds"] > 0
    table = format_selection_table(doc)
    assert "chosen by validation:" in table and "chosen by cv:3:" in table and "validation - test" in table


def test_ensemble_by_cv(swept):
    row = ensemble(swept, top_k="auto", select="cv:3", log=quiet)
    assert row["select"] == "cv:3" and row["selection_seconds"] > 0 and len(row["member_cv_accuracy"]) == row["k"]
    assert all("cv_accuracy" in e for e in row["by_k"])
    assert row["cv_accuracy"] == max(e["cv_accuracy"] for e in row["by_k"])
    assert row["member_cv_accuracy"] == sorted(row["member_cv_accuracy"], reverse=True)
    again = ensemble(swept, top_k="auto", select="cv:3", log=quiet)
    assert again["already_recorded"]
    by_val = ensemble(swept, top_k="auto", log=quiet)   # another request: not the same row
    assert not by_val["already_recorded"] and by_val["select"] == "validation" and "cv_accuracy" not in by_val


def test_unhappy_paths_are_one_line(swept, tmp_path):
    for args, message in ((["select", swept, "--select", "cv:31"], "cv:31 needs at least 31 train + val items"),
                          (["select", swept, "--select", "cv:1"], "K must be an integer of at least 2"),
                          (["ensemble", swept, "--select", "cv:0"], "K must be an integer of at least 2"),
                          (["select", swept, "--select", "validation"], "give cv:K")):
        result = invoke(heads, args)
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, args
    end_to_end = Member(Path(tmp_path / "3A-concat"), "end-to-end", 0.9, tmp_path / "s.h5", (), ("a",), True, "x",
                        lambda xs: None)
    with pytest.raises(ValueError, match="refits heads and decision-level models only; .* holds a model of kind end-to-end"):
        cross_validate([end_to_end], Selection("cv", 5), log=quiet)


def test_cli_select(swept):
    result = invoke(heads, ["select", swept, "--select", "cv:2"])
    assert result.exit_code == 0, result.output
    assert "| model | validation | cv:2 | test |" in result.output and "refit 4 models 2 times" in result.output
