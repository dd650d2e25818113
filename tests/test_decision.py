"""LF, ST and LR-* (heads/decision.py) in `heads sweep`: choices on validation, out-of-fold stacking, rows, the
saved model, refusals, the grid and the report."""
import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.heads import main
from embedstore.store import FeatureStore
from heads.decision import DecisionFits, LinearSettings, late_weight, out_of_fold
from heads.decision_model import DecisionModel
from heads.grid import decision_cells
from heads.report import write_report
from heads.results import read_runs
from heads.sweep import SweepSettings, run_sweep
from heads.train import HeadData, TrainSettings
from store_factory import make_feature_store

pytestmark = pytest.mark.usefixtures("one_thread")

C = 4
FAST = TrainSettings(batch_size=32, max_epochs=3, patience=2, lr=3e-3)
ALL = ("LF", "ST", "LR-image", "LR-text", "LR-concat")


def make_store(path, *, image="signal", text="signal", n=240, seed=0, image_dim=24, text_dim=16, sources=None):
    """Features per modality: "signal" (class means + noise, separable), "noise" (no class information) or None
    (absent). `sources`: {"image": [names], "text": [names]} for several backbones."""
    sources = sources or {"image": ["img"], "text": ["txt"]}
    features, separation = {}, {}
    for modality, kind, dim in (("image", image, image_dim), ("text", text, text_dim)):
        if kind is not None:
            for source in sources[modality]:
                features[f"{modality}/{source}/pooled"] = dim
                separation[f"{modality}/{source}/pooled"] = 2.0 if kind == "signal" else 0.0
    return make_feature_store(path, classes=C, per_split=(n // 2, n // 4, n // 4), features=features,
                              separation=separation, seed=seed,
                              provenance={name: {"parameters": 100} for name in features}).path


def settings(strategies=ALL, seeds=(0, 1), baselines=False):
    return SweepSettings(strategies=strategies, seeds=seeds, baselines=baselines, train=FAST, device="cpu", jobs=1,
                         progress=False)


def fits_of(store_path, linear=LinearSettings()):
    with FeatureStore(store_path) as store:
        data = store.load(["image/img/pooled", "text/txt/pooled"])
        head_data = HeadData.from_arrays([data.features["image/img/pooled"], data.features["text/txt/pooled"]],
                                         data.labels, data.split)
        return DecisionFits(head_data, {"image": 0, "text": 1}, C, linear), list(store.classes)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("decision")
    store = make_store(root / "store.h5", image="noise")   # the photo says nothing here: LF must lean on text
    summary = run_sweep(store, root / "results", settings(ALL + ("text",)), log=lambda _: None)
    return store, root / "results", summary


def test_late_fusion_weight_follows_validation(swept, tmp_path):
    _, results, _ = swept
    rows = [r for r in read_runs(results) if r["cell"] == "LF"]
    assert len(rows) == 2 and all(r["chosen"]["w"] <= 0.2 for r in rows)   # image is noise: weight on text
    assert all(r["test_accuracy"] > 0.9 for r in rows)
    other = make_store(tmp_path / "store.h5", text="noise")                 # and the other way round
    run_sweep(other, tmp_path / "results", settings(("LF",), seeds=(0,)), log=lambda _: None)
    (row,) = read_runs(tmp_path / "results")
    assert row["chosen"]["w"] >= 0.8 and row["test_accuracy"] > 0.9


def test_late_weight_ties_go_to_lower_log_loss():
    y = np.array([0, 1, 0, 1])
    sure = np.log(np.array([[0.99, 0.01], [0.01, 0.99]] * 2))   # right and confident
    unsure = np.log(np.array([[0.6, 0.4], [0.4, 0.6]] * 2))      # right, less sure: same accuracy
    w, acc = late_weight(sure, unsure, y, steps=5)
    assert acc == 1.0 and w == 1.0


def test_stacking_trains_on_out_of_fold_predictions(tmp_path):
    # image: 200-d noise, which a regression fits perfectly on its own train rows (in-fold) but which says nothing
    # about held-out rows. A stacker fed in-fold predictions would trust the image; out-of-fold ones, the text.
    store = make_store(tmp_path / "store.h5", image="noise", image_dim=200, text_dim=8, seed=3)
    fits, classes = fits_of(store)
    (image, _), _ = fits.linear("image")
    train_x, train_y = fits.splits["train"][0]["image"], fits.splits["train"][1]
    assert (image.log_proba(train_x).argmax(1) == train_y).mean() > 0.95      # in-fold: memorised
    oof = out_of_fold(train_x, train_y, image.C, C, 5, 0, 500)
    assert (oof.argmax(1) == train_y).mean() < 0.5                             # out of fold: near chance (0.25)
    model, _, _, chosen = fits.model("ST", 0, classes)
    assert fits.test_metrics(model)["accuracy"] > 0.9 and chosen["folds"] == 5
    assert not np.allclose(oof, out_of_fold(train_x, train_y, image.C, C, 5, 1, 500))   # the seed draws the folds


def test_rows_have_the_sweep_schema(swept):
    _, results, summary = swept
    rows = read_runs(results)
    head_row = next(r for r in rows if r["cell"] == "text")
    assert summary["trained"] == len(rows) == 2 * 6
    for r in (r for r in rows if r["strategy"] in ALL):
        assert set(head_row) <= set(r), set(head_row) - set(r)
        assert r["fusion"] is None and r["cell_base"] == r["strategy"] and r["store"]["path"] == "../store.h5"
        assert 0.0 <= r["test_macro_f1"] <= 1.0 and r["train_seconds"] > 0 and r["non_trainable_parameters"] > 0
    by = {(r["cell"], r["seed"]): r for r in rows}
    assert by["LR-text", 0]["trainable_parameters"] == C * (16 + 1)          # coefficients + intercepts
    assert by["LR-concat", 0]["trainable_parameters"] == C * (24 + 16 + 1)
    assert by["LF", 0]["trainable_parameters"] == C * (24 + 1) + C * (16 + 1)
    assert by["ST", 0]["trainable_parameters"] == C * (24 + 1) + C * (16 + 1) + C * (2 * C + 1)
    assert by["LR-text", 0]["chosen"]["C"] in LinearSettings().c_grid and "C_stack" in by["ST", 0]["chosen"]
    # LR and LF do not depend on the seed (and say so); their seeds repeat one result
    assert by["LF", 0]["test_accuracy"] == by["LF", 1]["test_accuracy"] and "deterministic" in by["LF", 0]["seed_note"]
    assert by["LF", 0]["run_key"] != by["LF", 1]["run_key"] and not by["ST", 0]["config"] == by["LF", 0]["config"]


def test_reruns_skip(swept):
    store, results, _ = swept
    before = read_runs(results)
    again = run_sweep(store, results, settings(ALL + ("text",)), log=lambda _: None)
    assert again["trained"] == 0 and again["skipped"] == len(before) and read_runs(results) == before
    more = run_sweep(store, results, settings(("LF",), seeds=(0, 1, 2)), log=lambda _: None)
    assert more["trained"] == 1 and more["skipped"] == 2


def test_saved_model_round_trips(swept, tmp_path):
    store, results, _ = swept
    for cell in ("LF", "ST", "LR-concat", "LR-image"):
        model = DecisionModel.from_pretrained(results / "heads" / cell)
        meta = model.metadata
        with FeatureStore(results / "heads" / cell / meta["store"]["path"]) as opened:
            data = opened.load(meta["inputs"])
        test = data.split == "test"
        xs = [data.features[n][test] for n in meta["inputs"]]
        predicted = model.predict(xs)
        assert np.mean(predicted == np.asarray(model.classes)[data.labels[test]]) == meta["test_accuracy"]
        model.save_pretrained(tmp_path / cell, metadata={"note": "again"})
        again = DecisionModel.from_pretrained(tmp_path / cell)
        np.testing.assert_array_equal(again.predict_proba(xs), model.predict_proba(xs))
        assert np.allclose(model.predict_proba(xs).sum(1), 1.0)
    with pytest.raises(ValueError, match="widths"):
        model.predict([np.zeros((2, 3))])


def test_one_modality_store_refuses_late_fusion_in_one_line(tmp_path):
    store = make_store(tmp_path / "store.h5", image=None)
    result = CliRunner().invoke(main, ["sweep", str(store), "--out", str(tmp_path / "r"), "--strategies", "LF",
                                       "--seeds", "0", "--no-progress"])
    assert result.exit_code != 0
    assert "strategy LF needs image 'pooled' features" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    with FeatureStore(store) as opened:   # the default grid keeps what it can serve: LR-text, the rest noted
        cells, notes = decision_cells(opened, strategies=None, baselines=True)
    assert [c.name for c in cells] == ["LR-text"] and len(notes) == 5   # LF, ST, LR-concat, LR-image, LFM


def test_default_grid_and_pair_names(tmp_path):
    store = make_store(tmp_path / "store.h5", sources={"image": ["img1", "img2"], "text": ["txt"]})
    with FeatureStore(store) as opened:
        cells, notes = decision_cells(opened, strategies=None, baselines=True)
        no_baselines, _ = decision_cells(opened, strategies=None, baselines=False)
    names = [c.name for c in cells]
    assert "LF@img1+txt" in names and "ST@img2+txt" in names and "LR-image@img2" in names and "LR-text@txt" in names
    assert len(names) == 3 * 2 + 2 + 1 and [n[:12] for n in notes] == ["skipped LFM:"]   # no module outputs here
    assert {c.strategy for c in no_baselines} == {"LF", "ST", "LR-concat"}
    lf = next(c for c in cells if c.name == "LF@img2+txt")
    assert lf.feature_sets == lf.row_sets == ("image/img2/pooled", "text/txt/pooled")


def _row(cell, strategy, fusion, val, test, seed=0):
    return {"run_key": f"{cell}{seed}", "cell": cell, "strategy": strategy, "fusion": fusion, "pair": "a+b",
            "config": {"strategy": strategy}, "train_settings": {}, "store": {"manifest_sha256": "m"},
            "test_accuracy": test, "test_macro_f1": test, "best_val_accuracy": val, "train_seconds": 1.0,
            "best_epoch": None if fusion is None else 3, "epochs_run": None if fusion is None else 5,
            "trainable_parameters": 10, "non_trainable_parameters": 5}


def test_report_rows_and_best_multimodal_by_validation(swept, tmp_path):
    rows = [_row("2A-concat", "2A", "concat", 0.90, 0.95), _row("LF", "LF", None, 0.93, 0.92),
            _row("ST", "ST", None, 0.91, 0.91), _row("LR-text", "LR-text", None, 0.9, 0.9),
            _row("text", "text", None, 0.8, 0.8)]
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path / "rows", tmp_path / "rows-report")

    def table(name):   # the report's CSV of that table, less its header
        return list(csv.reader((tmp_path / "rows-report" / f"{name}.csv").open()))[1:]

    table5 = {r[0]: r for r in table("table5_strategies")}
    assert set(table5) == {"2A", "LF", "ST"} and "late" in table5["LF"][2]
    table7 = [r[0] for r in table("table7_unimodal_vs_multimodal")]
    assert table7 == ["text only", "logistic regression on standardized pooled features (LR-text)",
                      "multimodal (best by validation: LF)"]
    _, results, _ = swept
    written = write_report(results, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| LF |" in text and "| ST |" in text and "LR-concat" in text and len(written) > 3


def make_module_store(path, *, image_noise: bool, n=240, seed=3):
    """A store of two modules' classifier outputs (C logits each, 1-B's inputs): the text module's logits point at
    the class, the image module's at the class too or (image_noise) at nothing."""
    rng = np.random.default_rng(seed)
    onehot = np.eye(C)[np.arange(n) % C] * 3   # the factory's labels: row i is class i % C
    image = rng.normal(size=(n, C)) * 3 if image_noise else onehot + rng.normal(size=(n, C)) * 1.5
    text = onehot + rng.normal(size=(n, C)) * 1.2
    return make_feature_store(path, classes=C, per_split=(n // 2, n // 4, n // 4),
                              features={"image/module-a/classifier": image, "text/module-b/classifier": text},
                              provenance={"image/module-a/classifier": {"parameters": 10},
                                          "text/module-b/classifier": {"parameters": 10}}).path


@pytest.mark.parametrize("image_noise", [True, False])
def test_lfm_fuses_the_modules_outputs_with_a_weight_chosen_on_validation(tmp_path, image_noise):
    store = make_module_store(tmp_path / "store.h5", image_noise=image_noise)
    run_sweep(store, tmp_path / "results", settings(("LFM",), seeds=(0,)), log=lambda _: None)
    (row,) = read_runs(tmp_path / "results")
    assert row["strategy"] == "LFM" and list(row["store"]["feature_sets"]) == ["image/module-a/classifier",
                                                                                "text/module-b/classifier"]
    if image_noise:
        assert row["chosen"]["w"] <= 0.2          # the image module says nothing: lean on text
    else:
        assert 0.1 <= row["chosen"]["w"] <= 0.9   # both informative: a real mixture beats either alone
    model = DecisionModel.from_pretrained(tmp_path / "results" / "heads" / "LFM")
    with FeatureStore(store) as s:
        data = s.load(list(row["store"]["feature_sets"]))
    xs = [data.features[n][data.split == "test"] for n in row["store"]["feature_sets"]]
    accuracy = (model.predict(xs) == np.asarray(model.classes)[data.labels[data.split == "test"]]).mean()
    assert accuracy == pytest.approx(row["test_accuracy"])   # the saved model is the row's model
    assert model.weight == row["chosen"]["w"]


def test_lfm_on_a_store_without_module_outputs_is_refused_in_one_line(tmp_path):
    store = make_store(tmp_path / "store.h5")
    with pytest.raises(ValueError, match=r"LFM needs image and text 'classifier' features.*embed extract"):
        run_sweep(store, tmp_path / "results", settings(("LFM",), seeds=(0,)), log=lambda _: None)
