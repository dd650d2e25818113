"""A strategy is one registration (heads/strategies.py): registered here, from outside the package, a new head
strategy is swept, saved, reported, ensembled and predicted through the ordinary commands with no other change.

The new strategy, "2C": frozen pretrained backbones, each pooled feature mapped straight to C class scores
(a "classifier" branch, no 500-d middle layer), the two fused by an operator. No module of the package names it.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cli.embed import embed
from cli.heads import heads
from embedstore.manifest import Manifest
from embedstore.store import FeatureStore
from embedstore.synthetic_catalog import make_fashion_catalog
from heads.estimator import FusionHead
from heads.models import HeadConfig, StackedHead
from heads.strategies import (Strategy, get_strategy, list_strategies, register_strategy, report_order,
                              unregister_strategy)
from tests.cli_helpers import TINY, ok

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = Strategy("2C", "head", ("image", "text"), "pooled", fused=True, branch=("classifier",),
               label="frozen pretrained backbones, pooled features mapped to class scores, fused")


@pytest.fixture(scope="module")
def registered():
    register_strategy(NEW)
    yield NEW
    unregister_strategy(NEW.name)


@pytest.fixture(scope="module")
def world(registered, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    info = make_fashion_catalog(root / "catalog", per_class=24, image_px=(48, 64))
    manifest, store, results = root / "manifest.json", root / "store.h5", root / "results"
    ok(embed, ["prepare", info.path, "--out", manifest, "--min-items", 20, "--items-per-class", 20,
               "--train", 12, "--val", 3, "--test", 5])
    ok(embed, ["extract", manifest, "--store", store, *TINY])
    # --jobs 2, not the default (the cores, 1 on a 1-core machine): the new strategy must reach spawned workers too
    ok(heads, ["sweep", store, "--out", results, "--strategies", "2C,2A", "--fusions", "add,concat", "--seeds", "0,1",
               "--device", "cpu", "--no-progress", "--jobs", "2"])
    return {"root": root, "info": info, "manifest": manifest, "store": store, "results": results}


def test_the_registry_describes_every_built_in_strategy():
    names = list_strategies()
    assert {"1A", "1B", "2A", "2B", "3A", "3B", "image", "text", "LR-image", "LR-text", "LR-concat", "LF", "ST",
            "LFM"} <= set(names)
    assert sorted(report_order()) == sorted(names)
    with pytest.raises(ValueError, match="unknown strategy 'nope'; known: 1A"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_strategy(get_strategy("2A"))
    with pytest.raises(ValueError, match="branch layers"):
        Strategy("X", "head", ("image", "text"), "pooled", fused=True, branch=("middle", "middle"), label="x")


def test_a_registered_strategy_builds_its_declared_architecture(registered):
    head = StackedHead(HeadConfig("2C", "add", (16, 8), num_classes=5))
    shapes = head.param_shapes()
    assert shapes["image_classifier.weight"] == (16, 5) and shapes["text_classifier.weight"] == (8, 5)
    assert not any("middle" in name for name in shapes)   # no 500-d layer: the branch is the classifier only
    assert shapes["fusion_layer.weight"] == (5, 250)      # add keeps the branch width, C


def test_swept_and_saved(world):
    rows = [json.loads(line) for line in (world["results"] / "runs.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["strategy"] == "2C"]
    assert sorted({r["cell"] for r in mine}) == ["2C-add", "2C-concat"] and len(mine) == 4
    assert all(np.isfinite(r["test_accuracy"]) for r in mine)
    head = FusionHead.from_pretrained(world["results"] / "heads" / "2C-concat")
    assert head.config_.strategy == "2C"
    # a rerun skips every cell, the new strategy's included
    out = ok(heads, ["sweep", world["store"], "--out", world["results"], "--strategies", "2C,2A", "--fusions",
                     "add,concat", "--seeds", "0,1", "--device", "cpu", "--no-progress"])
    assert "2C-concat: all 2 seeds already in" in out


def test_reported(world, tmp_path):
    ok(heads, ["report", world["results"], "--out", tmp_path / "report"])
    with open(tmp_path / "report" / "table5_strategies.csv", newline="") as handle:
        table5 = {row[0]: row for row in csv.reader(handle)}
    assert "2C" in table5 and "2A" in table5


def test_ensembled(world):
    ok(heads, ["ensemble", world["results"], "--top-k", "6"])   # 2 x 2C, 2 x 2A, image, text
    row = json.loads((world["results"] / "ensembles.jsonl").read_text().splitlines()[-1])
    assert {"heads/2C-add", "heads/2C-concat"} <= set(row["members"])


def test_predicted_from_raw_products(world, tmp_path):
    manifest = Manifest.load(world["manifest"])
    catalog = Path(world["info"].path)
    items = [i for i in manifest.items_in("test") if i.id != world["info"].corrupt_image_id][:6]
    products = tmp_path / "products.csv"
    with open(products, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "title", "image"])
        writer.writeheader()
        writer.writerows({"id": i.id, "title": i.title, "image": str(catalog / i.image)} for i in items)
    head_dir = world["results"] / "heads" / "2C-concat"
    ok(heads, ["predict", head_dir, products, "--out", tmp_path / "p.csv", "--device", "cpu"])
    with open(tmp_path / "p.csv", newline="") as handle:
        predicted = {row["id"]: row for row in csv.DictReader(handle)}
    head = FusionHead.from_pretrained(head_dir)
    with FeatureStore(world["store"]) as store:
        data = store.load(head.metadata_["inputs"])
    by_id = dict(zip(data.ids, head.predict_proba([data.features[n] for n in head.metadata_["inputs"]])))
    for i in items:
        assert predicted[i.id]["label_1"] == head.classes_[int(np.argmax(by_id[i.id]))]
