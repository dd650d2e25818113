"""`heads ensemble`: members ranked by validation (never test), auto-k, alignment by item id across stores,
skipped folders counted, no duplicate rows, relative paths, the report's section and the CLI."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.heads import main
from embedstore.model_folder import save_pretrained
from heads import ensemble as ensemble_module
from heads.ensemble import ENSEMBLES_FILE, ensemble
from heads.members import MEMBER_LOADERS, Member
from heads.report import write_report
from heads.results import read_runs
from heads.sweep import SweepSettings, run_sweep
from heads.train import TrainSettings
from store_factory import IMAGE, TEXT, make_feature_store

pytestmark = pytest.mark.usefixtures("one_thread")

C, N = 4, 240
SPLITS = (N // 2, N // 4, N // 4)   # train, val, test rows
FAST = TrainSettings(batch_size=32, max_epochs=6, patience=3, lr=3e-3)


def quiet(_):
    pass


def sweep(store, results, strategies, fusions=("concat",)):
    settings = SweepSettings(strategies=strategies, fusions=fusions, seeds=(0,), train=FAST, device="cpu", jobs=1,
                             progress=False)
    run_sweep(store, results, settings, log=quiet)
    return results


@pytest.fixture(scope="module")
def disagree(tmp_path_factory):
    """Validation and test disagree: the image features carry the class in train + val only (noise in test),
    the text features in train + test only (noise in val). So the image head ranks first by validation and is
    near chance on test, while the text head ranks last by validation and is best on test."""
    root = tmp_path_factory.mktemp("disagree")
    store = make_feature_store(root / "store.h5", classes=C, per_split=SPLITS, features={IMAGE: 24, TEXT: 16},
                               signal_free={IMAGE: ("test",), TEXT: ("val",)},
                               provenance={IMAGE: {"parameters": 10}, TEXT: {"parameters": 10}}).path
    return store, sweep(store, root / "results", ("2A", "image", "text"))


def copy_of(disagree, tmp_path):
    """A results folder of one's own, beside a copy of its store (heads name their store relative to them)."""
    store, results = disagree
    shutil.copy(store, tmp_path / "store.h5")
    return shutil.copytree(results, tmp_path / "results")


def recorded(results, cell):
    return json.loads((results / "heads" / cell / "config.json").read_text())


def test_top_k_ranks_by_recorded_validation_accuracy_not_test(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    saved = {cell: recorded(results, cell) for cell in ("2A-concat", "image", "text")}
    by_val = max(saved, key=lambda c: saved[c]["best_val_accuracy"])
    by_test = max(saved, key=lambda c: saved[c]["test_accuracy"])
    assert by_val != by_test == "text"  # the case is built so that the two rankings disagree

    row = ensemble(results, top_k=1, log=quiet)
    assert row["members"] == [f"heads/{by_val}"] and row["k"] == 1 and row["pool"] == 3
    assert row["member_val_accuracy"] == [saved[by_val]["best_val_accuracy"]]
    assert row["test_accuracy"] < saved["text"]["test_accuracy"] - 0.2
    assert row["val_accuracy"] == pytest.approx(saved[by_val]["best_val_accuracy"])  # same items, same head
    two = ensemble(results, top_k=2, log=quiet)
    assert "heads/text" not in two["members"]  # last by validation


def test_auto_k_is_chosen_by_validation_accuracy(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    row = ensemble(results, log=quiet)
    assert row["top_k"] == "auto" and [e["k"] for e in row["by_k"]] == [1, 2, 3]
    vals = [e["val_accuracy"] for e in row["by_k"]]
    tests = [e["test_accuracy"] for e in row["by_k"]]
    assert row["k"] == 1 + vals.index(max(vals))  # the first best: ties go to the smaller k
    assert 1 + tests.index(max(tests)) != row["k"]  # choosing by test would have picked another k
    chosen = row["by_k"][row["k"] - 1]
    assert (row["val_accuracy"], row["test_accuracy"]) == (chosen["val_accuracy"], chosen["test_accuracy"])
    assert len(row["members"]) == row["k"] and row["best_single"]["k"] == 1


def test_multimodal_only_leaves_the_baselines_out_and_counts_them(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    row = ensemble(results, multimodal_only=True, log=quiet)
    assert row["pool"] == 1 and row["members"] == ["heads/2A-concat"] and row["unimodal_left_out"] == 2


def test_rerun_skips_and_another_request_or_pool_adds_one_row(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    first = ensemble(results, log=quiet)
    again = ensemble(results, log=quiet)
    assert not first["already_recorded"] and again["already_recorded"]
    rows = read_runs(results, ENSEMBLES_FILE)
    assert len(rows) == 1 and rows[0]["run_key"] == again["run_key"]
    ensemble(results, top_k=2, log=quiet)
    assert len(read_runs(results, ENSEMBLES_FILE)) == 2
    shutil.rmtree(results / "heads" / "image")  # another pool: a new row, not the old one skipped
    assert not ensemble(results, log=quiet)["already_recorded"]
    assert len(read_runs(results, ENSEMBLES_FILE)) == 3
    assert read_runs(results) == read_runs(disagree[1])  # runs.jsonl untouched


def test_members_align_by_item_id_across_two_stores_and_count_the_items_left_out(tmp_path):
    """Two copies of one manifest: the second in another row order, each with other rows not ok (NaN)."""
    rng = np.random.default_rng(1)
    missing_a = [130, 131, 200]   # two val rows and one test row not ok in the first store
    missing_b = [131, 140, 210, 211]  # one val row shared with store a, one more val row, two test rows
    a = make_feature_store(tmp_path / "a" / "store.h5", classes=C, per_split=SPLITS, features={IMAGE: 24, TEXT: 16},
                           nan_rows={IMAGE: missing_a}, seed=rng)
    order = rng.permutation(N)  # row i of store b is item order[i]
    b = make_feature_store(tmp_path / "b" / "store.h5", classes=C, per_split=SPLITS, features={TEXT: a.features[TEXT]},
                           nan_rows={TEXT: missing_b}, row_order=order)
    store_a, store_b = a.path, b.path
    pooled = sweep(store_a, tmp_path / "a" / "results", ("2A",))
    modules = sweep(store_b, tmp_path / "b" / "results", ("text",))

    row = ensemble([pooled, modules], top_k=2, log=quiet)
    assert sorted(row["members"]) == ["../../b/results/heads/text", "heads/2A-concat"]
    assert row["items"] == {"val": {"scored": 60 - 3, "left_out": 3}, "test": {"scored": 60 - 3, "left_out": 3}}
    assert row["stores"] == ["../../b/store.h5", "../store.h5"]
    assert row["test_accuracy"] > 0.9  # chance is 0.25: rows of one item, not rows of one position, averaged
    for path in row["members"] + row["stores"] + row["results_dirs"]:  # relative to the first results folder
        assert not path.startswith("/") and (pooled / path).exists()
    assert "left out" in ensemble_module.format_summary(row)


def test_unreadable_folders_other_kinds_and_lost_stores_are_skipped_and_counted(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    heads_dir = results / "heads"
    (heads_dir / "empty").mkdir()
    (heads_dir / "corrupt").mkdir()
    (heads_dir / "corrupt" / "config.json").write_text("{not json")
    (heads_dir / "corrupt" / "model.safetensors").write_bytes(b"")
    save_pretrained(heads_dir / "a-module", {"w": torch.zeros(2)}, {"classes": []}, kind="module")
    (heads_dir / "new-kind").mkdir()
    (heads_dir / "new-kind" / "config.json").write_text(json.dumps(
        {"format": "embedstore-model", "format_version": 1, "kind": "linear-model"}))
    (heads_dir / "new-kind" / "model.safetensors").write_bytes(b"")
    shutil.copytree(heads_dir / "text", results / "elsewhere" / "heads" / "text")  # its store path now misses
    (heads_dir / ".2A-add.writing-x").mkdir()  # a save in progress: not a model, not counted

    row = ensemble([results, results / "elsewhere"], top_k="auto", log=quiet)
    assert row["pool"] == 3 and row["skipped_folders"] == 5
    notes = "\n".join(row["notes"])
    for name, reason in [("heads/empty", "not a saved model"), ("heads/corrupt", "not valid JSON"),
                         ("heads/a-module", "a module model, which no ensemble loader takes"),
                         ("heads/new-kind", "no known kind"), ("elsewhere/heads/text", "is gone")]:
        assert f"{name}: skipped (" in notes and reason in notes, name
    assert str(tmp_path) not in notes  # paths in notes are relative too


def test_one_more_member_kind_is_one_loader(disagree, tmp_path, monkeypatch):
    results = copy_of(disagree, tmp_path)
    save_pretrained(results / "heads" / "a-uniform", {"w": torch.zeros(1)}, {"classes": []}, kind="module")

    # a model that always says "class 2", recorded at validation accuracy 1.0: that ties the image head, and
    # ties go to the folder first in name order ("heads/a-uniform")
    def uniform(folder, config):
        return Member(folder, config["kind"], 1.0, results / "store-link.h5", ("text/tiny-txt/pooled",),
                      tuple(f"class{i}" for i in range(C)), False, "uniform-v1",
                      lambda xs: np.eye(C)[np.full(len(xs[0]), 2)])

    (results / "store-link.h5").symlink_to(disagree[0])
    monkeypatch.setitem(MEMBER_LOADERS, "module", uniform)
    row = ensemble(results, top_k=1, log=quiet)
    assert row["members"] == ["heads/a-uniform"] and row["member_kinds"] == ["module"]
    assert row["test_accuracy"] == pytest.approx(0.25)  # class 2 is a quarter of the items


def test_report_shows_the_ensemble_rows(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    write_report(results, tmp_path / "before")
    assert "Ensembles" not in (tmp_path / "before" / "report.md").read_text()
    row = ensemble(results, log=quiet)
    write_report(results, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Ensembles" in text and "ensemble of top-k by validation (multimodal heads + baselines)" in text
    assert f"| {row['k']} (auto) | {', '.join(row['members'])} | {100 * row['val_accuracy']:.2f} |" in text


def test_cli_prints_a_summary_and_gives_one_line_errors(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    runner = CliRunner()
    done = runner.invoke(main, ["ensemble", str(results), "--top-k", "2"])
    assert done.exit_code == 0, done.output
    assert "Ensemble of the top 2 of 3 saved heads" in done.output and "row appended to" in done.output
    assert "already in" in runner.invoke(main, ["ensemble", str(results), "--top-k", "2"]).output
    for args, message in [(["--top-k", "4"], "--top-k 4, but only 3 saved head(s) can join"),
                          (["--top-k", "two"], "top-k must be a positive integer or 'auto', got 'two'"),
                          (["--top-k", "0"], "top-k must be a positive integer or 'auto', got '0'")]:
        failed = runner.invoke(main, ["ensemble", str(results), *args])
        assert failed.exit_code == 2 and message in failed.output and "Traceback" not in failed.output, args
        assert len(failed.output.strip().splitlines()) == 1
    missing = runner.invoke(main, ["ensemble", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "no saved heads in" in missing.output and "heads sweep" in missing.output
    assert not (tmp_path / "absent").exists()  # refused before the lock could create it


def test_decision_level_models_join_as_members_with_their_own_probabilities(disagree, tmp_path):
    """An LF and an LR-text folder (kind "linear", heads/decision.py) are members like heads: ranked by their
    recorded validation accuracy, scored with their own predict_proba, counted as multimodal or not."""
    from embedstore.store import FeatureStore
    from heads.decision_model import DecisionModel

    results = copy_of(disagree, tmp_path)
    sweep(tmp_path / "store.h5", results, ("LF", "LR-text"))
    rows = ensemble(results, top_k="auto", log=quiet)
    assert rows["pool"] == 5 and not rows["skipped_folders"]
    single = ensemble(results, top_k=1, multimodal_only=True, log=quiet)
    assert single["unimodal_left_out"] == 3   # image, text, LR-text
    lf = DecisionModel.from_pretrained(results / "heads" / "LF")
    if single["members"] == ["heads/LF"]:     # LF ranks first among the multimodal ones: its own numbers back
        with FeatureStore(tmp_path / "store.h5") as store:
            data = store.load(lf.metadata["inputs"])
        test = data.split == "test"
        predicted = lf.predict([data.features[n][test] for n in lf.metadata["inputs"]])
        accuracy = (predicted == np.asarray(lf.classes)[data.labels[test]]).mean()
        assert single["test_accuracy"] == pytest.approx(accuracy)
    else:
        assert single["members"] == ["heads/2A-concat"]
        assert recorded(results, "2A-concat")["best_val_accuracy"] >= lf.metadata["best_val_accuracy"]


def test_only_narrows_the_pool_to_the_named_cells_and_a_pattern_naming_none_is_one_line(disagree, tmp_path):
    results = copy_of(disagree, tmp_path)
    said = []
    row = ensemble(results, top_k="auto", only="2A-*,text", log=said.append)
    assert sorted(row["members"] + [m for m in row.get("left_out_members", [])]) <= ["heads/2A-concat", "heads/text"]
    assert row["pool"] == 2 and row["only"] == ["2A-*", "text"] and row["not_named_left_out"] == 1
    assert any("--only 2A-*,text: 1 saved model(s) left out" in line for line in said)
    # a path pattern under the first results folder names the same models
    assert ensemble(results, top_k="auto", only=["heads/2A-*", "heads/text"], log=quiet)["already_recorded"]
    # every model named: the very ensemble of no --only (the pool is the key)
    whole = ensemble(results, top_k="auto", log=quiet)
    assert ensemble(results, top_k="auto", only="*", log=quiet)["run_key"] == whole["run_key"]

    result = CliRunner().invoke(main, ["ensemble", str(results), "--only", "3A-*"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]
    assert "--only 3A-* matches none of the 3 saved models (cells: 2A-concat, image, text)" in line
    result = CliRunner().invoke(main, ["ensemble", str(results), "--only", " , "])
    assert result.exit_code == 2 and "names no pattern" in result.output


def test_heads_select_takes_only_the_named_models(disagree, tmp_path):
    from heads.select import select_model

    results = copy_of(disagree, tmp_path)
    doc = select_model(results, "cv:2", only="image,text", log=quiet)
    assert sorted(c["member"] for c in doc["candidates"]) == ["heads/image", "heads/text"]
    result = CliRunner().invoke(main, ["select", str(results), "--select", "cv:2", "--only", "text"])
    assert result.exit_code == 0, result.output
    assert "heads/text" in result.output and "heads/2A-concat" not in result.output
