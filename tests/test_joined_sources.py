"""Joined sources (heads/joined.py): several backbones' feature sets read as one image (or text) input, swept,
keyed, streamed, ensembled and predicted like any source; bad joins refused in one line."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cli.embed import embed
from cli.heads import heads
from embedstore.manifest import Manifest
from embedstore.synthetic_catalog import make_fashion_catalog
from heads.ensemble import ensemble
from heads.joined import JoinedStore, members_of, open_store
from heads.results import read_runs
from heads.sweep import SweepSettings, run_sweep
from heads.train import TrainSettings
from store_factory import make_feature_store
from tests.cli_helpers import TINY, invoke, ok

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = TrainSettings(batch_size=32, max_epochs=4, patience=2, lr=3e-3)
A, B, T = "image/a/pooled", "image/b/pooled", "text/t/pooled"


def quiet(_):
    pass


def store_of(path, provenance=None, **extra):
    return make_feature_store(path, classes=4, per_split=(80, 40, 40), features={A: 12, B: 8, T: 6, **extra},
                              provenance=provenance or {A: {"parameters": 3}, B: {"parameters": 4}}).path


def sweep(store, results, sources, **kwargs):
    settings = SweepSettings(strategies=("2A", "image", "LR-concat"), fusions=("concat",), seeds=(0,), train=FAST,
                             device="cpu", jobs=1, progress=False, image_sources=sources, **kwargs)
    return run_sweep(store, results, settings, log=quiet)


def test_a_joined_source_is_swept_as_one_more_source(tmp_path):
    store = store_of(tmp_path / "s.h5")
    summary = sweep(store, tmp_path / "r", ("a", "b", "a,b"))
    assert {"2A-concat@a,b+t", "image@a,b", "LR-concat@a,b+t", "2A-concat@a+t"} <= set(summary["cells"])
    rows = {r["cell"]: r for r in read_runs(tmp_path / "r")}
    joined = rows["2A-concat@a,b+t"]
    assert joined["config"]["input_dims"] == [12 + 8, 6] and joined["image_source"] == "a,b"
    assert rows["image@a,b"]["config"]["input_dims"] == [20]
    assert rows["LR-concat@a,b+t"]["config"]["input_dims"] == [20, 6]
    provenance = joined["store"]["feature_sets"]["image/a,b/pooled"]
    assert [m["source"] for m in provenance["joined"]] == ["a", "b"] and provenance["dims"] == [12, 8]
    assert joined["non_trainable_parameters"] == 3 + 4   # the members' backbones
    keys = {r["run_key"] for r in rows.values()}
    assert len(keys) == len(rows)                    # a joined cell's key differs from each single source's
    assert (tmp_path / "r" / "heads" / "a,b+t" / "2A-concat" / "config.json").is_file()
    again = sweep(store, tmp_path / "r", ("a", "b", "a,b"))
    assert again["trained"] == 0 and again["skipped"] == len(rows)

    # the order of the members is the order of the columns: another source, other keys
    sweep(store, tmp_path / "r", ("b,a",))
    swapped = next(r for r in read_runs(tmp_path / "r") if r["image_source"] == "b,a" and r["strategy"] == "2A")
    assert swapped["config"]["input_dims"] == [20, 6] and swapped["run_key"] != joined["run_key"]


def test_a_member_changed_changes_the_key(tmp_path):
    one = store_of(tmp_path / "one.h5")
    other = store_of(tmp_path / "other.h5", provenance={A: {"parameters": 3}, B: {"parameters": 4, "weights_id": "x"}})
    sweep(one, tmp_path / "r1", ("a,b",))
    sweep(other, tmp_path / "r2", ("a,b",))
    key = {p: {r["cell"]: r["run_key"] for r in read_runs(tmp_path / p)} for p in ("r1", "r2")}
    assert key["r1"]["2A-concat"] != key["r2"]["2A-concat"]


def test_joined_values_are_the_members_side_by_side_in_memory_and_streamed(tmp_path):
    data = make_feature_store(tmp_path / "s.h5", classes=3, per_split=(30, 12, 12), features={A: 5, B: 3, T: 4},
                              nan_rows={B: [2]})
    with JoinedStore(tmp_path / "s.h5", {"image": ["a,b"]}) as store:
        info = store.feature_sets["image/a,b/pooled"]
        assert info.dim == 8 and info.counts["ok"] == 53
        loaded = store.load(["image/a,b/pooled", T])
        rows = np.array([int(i.removeprefix("item")) for i in loaded.ids])
        assert 2 not in rows   # skipped by member b: skipped by the joined source
        expected = np.concatenate([data.features[A][rows], data.features[B][rows]], axis=1)
        np.testing.assert_array_equal(loaded.features["image/a,b/pooled"], expected)
        dataset = store.dataset("image/a,b/pooled")
        assert dataset.shape == (54, 8)
        np.testing.assert_array_equal(dataset[10:14], np.concatenate([data.features[A][10:14],
                                                                      data.features[B][10:14]], axis=1))
    streamed = sweep(tmp_path / "s.h5", tmp_path / "r", ("a,b",), memory_budget=1)
    row = {r["cell"]: r for r in read_runs(tmp_path / "r")}["2A-concat"]
    assert row["store"]["data_access"] == "streamed" and streamed["trained"] >= 2


@pytest.mark.parametrize("join, extra, message", [
    ("a,zz", {}, "holds no image source 'zz' (its image sources: a, b)"),
    ("a,t", {}, "t is a text source, not one of the image sources; join sources of one modality"),
    ("a,m", {"image/m/dense": 4, "image/m/classifier": 4},
     "a holds pooled features and m classifier, dense; join sources of the same layer"),
    ("m,n", {"image/m/dense": 4, "image/m/classifier": 4, "image/n/dense": 4},
     "n has no 'classifier' layer, which m has"),
    ("a,,b", {}, "has an empty member"),
    ("a,a", {}, "names a member twice"),
])
def test_bad_joins_are_one_line_errors(tmp_path, join, extra, message):
    store = store_of(tmp_path / "s.h5", **extra)
    with pytest.raises(ValueError, match="joined|member") as error:
        with open_store(store, {"image": [join]}):
            pass
    assert message in str(error.value) and "\n" not in str(error.value)
    result = invoke(heads, ["sweep", store, "--out", tmp_path / "r", "--image-source", join, "--no-progress"])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_plain_sources_are_not_joins():
    assert members_of("efficientnet_lite0") is None
    assert members_of("efficientnet_lite0,efficientnet_lite2") == ("efficientnet_lite0", "efficientnet_lite2")


def test_a_joined_pool_ensembles(tmp_path):
    store = store_of(tmp_path / "s.h5")
    sweep(store, tmp_path / "r", ("a,b",))
    row = ensemble(tmp_path / "r", top_k="auto", log=quiet)
    assert row["pool"] == 4 and not row["notes"] and row["val_accuracy"] > 0.5   # 2A-concat, image, text, LR-concat


@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory):
    """A generated catalog, one store of tiny-resnet at 64 px and 48 px (two image sources) + tiny-bert, a sweep of
    2A-concat and LR-concat over the joined image source, and a CSV of the test items."""
    root = tmp_path_factory.mktemp("joined-predict")
    info = make_fashion_catalog(root / "catalog", per_class=30, image_px=(48, 64))
    manifest_path, store, results = root / "manifest.json", root / "store.h5", root / "results"
    ok(embed, ["prepare", info.path, "--out", manifest_path, "--min-items", 24, "--items-per-class", 24,
               "--train", 14, "--val", 4, "--test", 6])
    ok(embed, ["extract", manifest_path, "--store", store, *TINY])
    ok(embed, ["extract", manifest_path, "--store", store, "--image-backbone", "tiny-resnet", "--image-size", 48,
               "--text-backbone", "none", "--workers", 0, "--no-progress", "--add"])
    join = "tiny-resnet-64px,tiny-resnet-48px"
    ok(heads, ["sweep", store, "--out", results, "--strategies", "2A,LR-concat", "--fusions", "concat",
               "--seeds", 0, "--device", "cpu", "--image-source", join, "--jobs", 1])   # no workers to start
    manifest = Manifest.load(manifest_path)
    test_items = [item for item in manifest.items_in("test") if item.id != info.corrupt_image_id]
    with open(root / "products.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "title", "image"])
        writer.writeheader()
        writer.writerows({"id": i.id, "title": i.title, "image": str(Path(info.path) / i.image)} for i in test_items)
    return {"store": store, "results": results, "csv": root / "products.csv", "join": join,
            "ids": [i.id for i in test_items]}


@pytest.mark.parametrize("cell", ["2A-concat", "LR-concat"])
def test_predict_rebuilds_every_member(two_backbones, tmp_path, cell):
    from embedstore.model_folder import read_config

    folder = two_backbones["results"] / "heads" / cell
    doc = json.loads((folder / "config.json").read_text())
    meta = doc.get("metadata", doc)
    name = f"image/{two_backbones['join']}/pooled"
    assert meta["inputs"][0] == name and read_config(folder)["kind"] in ("fusion-head", "linear")
    out = tmp_path / "pred.csv"
    ok(heads, ["predict", folder, two_backbones["csv"], "--out", out, "--top-k", 1, "--device", "cpu",
               "--workers", 0, "--batch-size", 7])
    with open(out, newline="") as handle:
        predicted = {r["id"]: r for r in csv.DictReader(handle)}
    # the same model's probabilities over the store's (joined) features
    from heads.decision import DecisionModel
    from heads.estimator import FusionHead
    model = FusionHead.from_pretrained(folder) if cell == "2A-concat" else DecisionModel.from_pretrained(folder)
    with open_store(two_backbones["store"], {"image": [two_backbones["join"]]}) as store:
        data = store.load(meta["inputs"])
        classes = list(store.classes)
    proba = dict(zip(data.ids, model.predict_proba([data.features[n] for n in meta["inputs"]])))
    for item in two_backbones["ids"]:
        row = predicted[item]
        assert row["reason"] == "" and row["label_1"] == classes[int(proba[item].argmax())]
        assert float(row["probability_1"]) == pytest.approx(float(proba[item].max()), abs=1e-4)
