"""Sweeps over generated stores: separation, skip-existing, saved heads, refusals, the CLI and the report."""
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import embedstore
from cli.heads import main
from embedstore.store import FeatureStore
from heads.estimator import FusionHead
from heads.decision_model import DecisionModel
from embedstore.model_folder import read_config
from heads.results import read_runs
from heads.sweep import SweepSettings, run_sweep
from heads.train import TrainSettings
from store_factory import IMAGE, TEXT, make_feature_store


pytestmark = pytest.mark.usefixtures("one_thread")


C = 4
FAST = TrainSettings(batch_size=32, max_epochs=6, patience=3, lr=3e-3)


def make_store(path, *, modules=True, classifier_dim=C, n=240, seed=0):
    """Class-dependent Gaussian features (separable), every class in every split."""
    features = {IMAGE: 24, TEXT: 16}
    provenance = {IMAGE: {"parameters": 1000}, TEXT: {"parameters": 500}}
    if modules:
        features.update({"image/img-module/dense": 8, "image/img-module/classifier": classifier_dim,
                         "text/txt-module/dense": 8, "text/txt-module/classifier": classifier_dim})
        provenance.update({"image/img-module/dense": {"parameters": 1200},
                           "image/img-module/classifier": {"parameters": 1200}})
    return make_feature_store(path, classes=C, per_split=(n // 2, n // 4, n // 4), features=features,
                              provenance=provenance, seed=seed).path


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    store = make_store(root / "store.h5")
    settings = SweepSettings(fusions=("concat", "gated"), seeds=(0, 1), train=FAST, device="cpu", jobs=1,
                             progress=False)
    summary = run_sweep(store, root / "results", settings, log=lambda _: None)
    return store, root / "results", settings, summary


def test_sweep_separates_classes(swept):
    _, results, _, summary = swept
    rows = read_runs(results)
    # the default grid: heads x operators, the unimodal heads, and the decision-level models (heads/decision.py;
    # LFM over the modules' classifier outputs, which this store holds)
    assert summary["trained"] == len(rows) == (4 * 2 + 2 + 6) * 2
    assert {r["cell"] for r in rows} == {f"{s}-{f}" for s in ("1A", "1B", "2A", "2B") for f in ("concat", "gated")} \
        | {"image", "text", "LF", "ST", "LR-image", "LR-text", "LR-concat", "LFM"}
    for r in rows:
        if r["strategy"] in ("1A", "2A", "image", "text"):
            assert r["test_accuracy"] > 0.8, r["cell"]  # chance is 0.25
    row = next(r for r in rows if r["cell"] == "1A-gated")
    assert row["store"]["manifest_sha256"] == "test-manifest"
    assert set(row["store"]["feature_sets"]) == {"image/img-module/dense", "text/txt-module/dense"}
    assert row["non_trainable_parameters"] == 1200 and "text/txt-module/dense" in row["non_trainable_note"]
    assert row["trainable_parameters"] > 0 and row["epochs_run"] >= row["best_epoch"] >= 1


def test_runs_already_in_results_are_skipped(swept):
    store, results, settings, _ = swept
    before = read_runs(results)
    again = run_sweep(store, results, settings, log=lambda _: None)
    assert again["trained"] == 0 and again["skipped"] == len(before)
    assert read_runs(results) == before
    more = run_sweep(store, results, SweepSettings(strategies=("2A",), fusions=("gated",), seeds=(0, 1, 2),
                                                   baselines=False, train=FAST, device="cpu"), log=lambda _: None)
    assert more["trained"] == 1 and more["skipped"] == 2
    saved = json.loads((results / "heads" / "2A-gated" / "config.json").read_text())
    best_val = max(r["best_val_accuracy"] for r in read_runs(results) if r["cell"] == "2A-gated")
    assert saved["best_val_accuracy"] == best_val  # the saved head is the cell's best over all its seeds


def test_saved_best_head_round_trips(swept):
    store, results, _, _ = swept
    head = FusionHead.from_pretrained(results / "heads" / "2A-gated")
    saved = json.loads((results / "heads" / "2A-gated" / "config.json").read_text())
    with FeatureStore(store) as s:
        data = s.load(saved["inputs"])
    test = data.split == "test"
    pred = head.predict([data.features[n][test] for n in saved["inputs"]])
    assert (pred == np.asarray(saved["classes"])[data.labels[test]]).mean() == pytest.approx(saved["test_accuracy"])
    best_run = next(r for r in read_runs(results) if r["run_key"] == saved["run_key"])
    assert best_run["test_accuracy"] == pytest.approx(saved["test_accuracy"])
    assert not list(results.rglob("*.pt")) and not list(results.rglob("*.pkl"))


def test_store_without_module_features_is_refused(tmp_path):
    store = make_store(tmp_path / "s.h5", modules=False)
    with pytest.raises(ValueError, match=r"1A needs image 'dense' and text 'dense'.*--image-module DIR --text-module"):
        run_sweep(store, tmp_path / "r", SweepSettings(strategies=("1A",), train=FAST), log=lambda _: None)
    assert not (tmp_path / "r" / "runs.jsonl").exists()


def test_a_store_of_one_modality_gets_its_baseline(tmp_path):
    store = make_feature_store(tmp_path / "s.h5", classes=C, features={IMAGE: 8},
                               splits=[("train", "train", "val", "test")[(i // C) % 4] for i in range(120)]).path
    with pytest.raises(ValueError, match="2A needs text 'pooled'.*embed extract MANIFEST --store STORE"):
        run_sweep(store, tmp_path / "r", SweepSettings(strategies=("2A",), train=FAST), log=lambda _: None)
    train = TrainSettings(batch_size=16, max_epochs=15, lr=1e-2)
    summary = run_sweep(store, tmp_path / "r", SweepSettings(strategies=("image",), baselines=False, seeds=(0,),
                                                             train=train), log=lambda _: None)
    assert summary["cells"] == ["image"] and read_runs(tmp_path / "r")[0]["test_accuracy"] > 0.8


def test_classifier_features_of_another_class_count_are_refused(tmp_path):
    store = make_store(tmp_path / "s.h5", classifier_dim=C + 1)
    with pytest.raises(ValueError, match=r"5\].*4 classes"):
        run_sweep(store, tmp_path / "r", SweepSettings(strategies=("1B",), train=FAST), log=lambda _: None)


def test_cli_sweep_then_report(tmp_path):
    store = make_store(tmp_path / "s.h5")
    runner = CliRunner()
    res = runner.invoke(main, ["sweep", str(store), "--out", str(tmp_path / "r"), "--strategies", "2A,1B",
                               "--fusions", "add,average", "--seeds", "0,1", "--max-epochs", "4", "--device", "cpu",
                               "--jobs", "1"])
    assert res.exit_code == 0, res.output
    assert "trained 12 heads" in res.output
    res = runner.invoke(main, ["report", str(tmp_path / "r"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    for name in ("report.md", "table5_strategies.csv", "table6_fusions.csv", "table7_unimodal_vs_multimodal.csv",
                 "cells.csv", "accuracy.png", "training_time.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Table 5" in md and "| 2A |" in md and "text only" in md
    # every figure written is linked, relative to the report
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == sorted(p.name for p in (tmp_path / "rep").glob("*.png"))


@pytest.mark.parametrize("flag,sizes", [([], {2}), (["--no-group-cells"], {1})])
def test_cli_groups_cells_of_one_shape_unless_told_not_to(tmp_path, flag, sizes):
    store = make_store(tmp_path / "s.h5")
    res = CliRunner().invoke(main, ["sweep", str(store), "--out", str(tmp_path / "r"), "--strategies", "2A",
                                    "--fusions", "add,average", "--seeds", "0", "--no-baselines", "--max-epochs", "2",
                                    "--device", "cpu", "--jobs", "1"] + flag)
    assert res.exit_code == 0, res.output
    assert {r["group_size"] for r in read_runs(tmp_path / "r")} == sizes   # 2A-add + 2A-average, or alone


@pytest.mark.parametrize("args,message", [
    (["--fusions", "attention"], "unknown fusion operator 'attention'"),
    (["--strategies", "3C"], "unknown strategy '3C'"),  # 3A/3B exist: heads/end_to_end.py
    (["--seeds", "a,b"], "--seeds takes comma-separated integers"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--threads", "0"], "'--threads'"),
    (["--max-epochs", "0"], "'--max-epochs'"),
    (["--batch-size", "-5"], "'--batch-size'"),
    (["--lr", "-1"], "'--lr'"),
    (["--lr", "nan"], "'--lr'"),
    (["--jobs", "0"], "'--jobs'"),
    (["--image-source", "resnet9"], "--image-source resnet9"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    store = make_store(tmp_path / "s.h5")
    res = CliRunner().invoke(main, ["sweep", str(store), "--out", str(tmp_path / "r")] + args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_cli_refuses_missing_store_and_module_features(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["sweep", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "no feature store" in res.output
    store = make_store(tmp_path / "s.h5", modules=False)
    res = runner.invoke(main, ["sweep", str(store), "--out", str(tmp_path / "r"), "--strategies", "1A"])
    assert res.exit_code == 2 and "embed extract" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(main, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 2 and "no runs" in res.output


def test_saved_heads_reproduce_their_recorded_validation_accuracy_exactly(swept):
    """The saved weights are the best epoch's: reloaded, each head scores exactly its recorded
    best_val_accuracy on the store's val split (the last epoch's weights would not, where training went on)."""
    store, results, _, _ = swept
    went_on = 0
    with embedstore.open_store(store) as opened:
        for folder in sorted((results / "heads").iterdir()):
            linear = read_config(folder)["kind"] == "linear"   # LF / ST / LR-* (heads/decision.py): no epochs
            head = DecisionModel.from_pretrained(folder) if linear else FusionHead.from_pretrained(folder)
            meta = head.metadata if linear else head.metadata_
            X, y = opened.arrays("val", meta["inputs"])
            assert (head.predict(X) == y).mean() == meta["best_val_accuracy"], folder.name
            run = next(r for r in read_runs(results) if r["run_key"] == meta["run_key"])
            went_on += not linear and run["epochs_run"] > run["best_epoch"]
    assert went_on > 0  # some saved head trained past its best epoch, so the check can tell them apart
