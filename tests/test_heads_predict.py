"""`heads predict` on a generated catalog: prepare -> extract -> heads sweep -> predict, with tiny random backbones
(tiny-resnet on 64 px images, tiny-bert). Predictions from raw images and titles must match the same head's
predictions from the store's features; bad rows carry their reasons; mismatching weights are refused."""
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cli.embed import embed
from cli.heads import heads
from embedstore.backbones import create_backbone
from embedstore.catalog import open_catalog
from embedstore.manifest import Manifest
from embedstore.model_folder import save_pretrained
from embedstore.store import FeatureStore
from embedstore.synthetic_catalog import make_fashion_catalog
from heads.end_to_end import EndToEndSettings, load_end_to_end, train_end_to_end
from heads.estimator import FusionHead
from tests.cli_helpers import TINY, invoke, ok, s2_modules_and_a_1a_head

TOP_K = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A catalog, its manifest, a store of both tiny backbones, a sweep of 2A-concat (+ baselines), and an input
    CSV of the test items plus a missing image, a corrupt image and an empty title."""
    root = tmp_path_factory.mktemp("predict")
    info = make_fashion_catalog(root / "catalog", per_class=30, image_px=(48, 64))
    manifest_path, store, results = root / "manifest.json", root / "store.h5", root / "results"
    ok(embed, ["prepare", info.path, "--out", manifest_path, "--min-items", 24, "--items-per-class", 24,
               "--train", 14, "--val", 4, "--test", 6])
    ok(embed, ["extract", manifest_path, "--store", store, *TINY])
    ok(heads, ["sweep", store, "--out", results, "--strategies", "2A", "--fusions", "concat", "--seeds", 0,
               "--device", "cpu", "--jobs", 1])
    manifest = Manifest.load(manifest_path)
    # the corrupt JPEG may be drawn into the test split; the store skipped it, so it has no store prediction
    test_items = [item for item in manifest.items_in("test") if item.id != info.corrupt_image_id]
    images = Path(info.path) / "images"
    new = root / "new"
    new.mkdir()
    rows = [{"id": item.id, "image": f"../catalog/{Path(info.path).name}/{item.image}", "title": item.title}
            for item in test_items]
    rows[0]["image"] = str(images / f"{test_items[0].id}.jpg")  # absolute paths work too
    bad = {"missing": {"id": "missing", "image": "no/such.jpg", "title": test_items[0].title},
           "corrupt": {"id": "corrupt", "image": str(images / f"{info.corrupt_image_id}.jpg"),
                       "title": test_items[1].title},
           "empty": {"id": "empty", "image": rows[2]["image"], "title": " & the of !"}}  # empty once cleaned
    rows[3:3] = list(bad.values())
    with open(new / "products.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "title", "image"])
        writer.writeheader()
        writer.writerows(rows)
    return {"root": root, "info": info, "manifest": manifest, "store": store, "results": results,
            "csv": new / "products.csv", "test_items": test_items}


def read_predictions(path: Path) -> tuple[list[str], dict[str, dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, {row["id"]: row for row in reader}


def store_probabilities(store: Path, head_dir: Path) -> dict[str, np.ndarray]:
    """The head's probabilities from the store's features, by item id."""
    head = FusionHead.from_pretrained(head_dir)
    with FeatureStore(store) as opened:
        data = opened.load(head.metadata_["inputs"])
    probabilities = head.predict_proba([data.features[n] for n in head.metadata_["inputs"]])
    return dict(zip(data.ids, probabilities))


def assert_same_as_store(predictions: dict, expected: dict, classes: list[str], ids) -> None:
    for item_id in ids:
        row, p = predictions[item_id], expected[item_id]
        assert row["reason"] == "" and row["label_1"] == classes[int(p.argmax())], item_id
        shown = [float(row[f"probability_{k}"]) for k in range(1, TOP_K + 1)]
        assert shown == sorted(shown, reverse=True) and sum(shown) <= 1 + 1e-5
        for k in range(1, TOP_K + 1):
            assert float(row[f"probability_{k}"]) == pytest.approx(p[classes.index(row[f"label_{k}"])], abs=1e-4)


def test_predictions_from_raw_products_match_the_store(world, tmp_path):
    head_dir = world["results"] / "heads" / "2A-concat"
    out = tmp_path / "pred.csv"
    output = ok(heads, ["predict", head_dir, world["csv"], "--out", out, "--top-k", TOP_K, "--batch-size", 5,
                        "--device", "cpu", "--workers", 0])
    test_ids = [item.id for item in world["test_items"]]
    assert f"predicted {len(test_ids)} of {len(test_ids) + 3} rows" in output
    assert "missing image 1" in output and "unreadable image 1" in output and "empty title 1" in output

    columns, predictions = read_predictions(out)
    assert columns == ["id", "label_1", "probability_1", "label_2", "probability_2", "reason"]
    assert list(predictions)[:5] == [test_ids[0], test_ids[1], test_ids[2], "missing", "corrupt"]  # input order
    for item_id, reason in (("missing", "missing image"), ("corrupt", "unreadable image"), ("empty", "empty title")):
        row = predictions[item_id]
        assert row["reason"] == reason and all(row[c] == "" for c in columns[1:-1])

    classes = json.loads((head_dir / "config.json").read_text())["classes"]
    assert_same_as_store(predictions, store_probabilities(world["store"], head_dir), classes, test_ids)
    labels = {item.id: item.label for item in world["test_items"]}
    accuracy = np.mean([predictions[i]["label_1"] == labels[i] for i in test_ids])
    assert accuracy >= 0.8  # chance is 1/3


def test_unimodal_heads_need_only_their_modality(world, tmp_path):
    text_only = tmp_path / "titles.csv"
    # a CSV with no image column, its own column names and no id column: row numbers become the ids
    with open(world["csv"], newline="") as src:
        records = list(csv.DictReader(src))
    with open(text_only, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["name"])
        writer.writerows([[r["title"]] for r in records])
    out = tmp_path / "text.csv"
    ok(heads, ["predict", world["results"] / "heads" / "text", text_only, "--out", out, "--title-column", "name",
               "--device", "cpu"])
    _, predictions = read_predictions(out)
    assert list(predictions) == [str(n) for n in range(1, len(records) + 1)]
    reasons = {records[int(i) - 1]["id"]: row["reason"] for i, row in predictions.items()}
    assert reasons["missing"] == reasons["corrupt"] == "" and reasons["empty"] == "empty title"

    # the image head over the catalog itself (a Fashion folder): titles are never looked at
    out = tmp_path / "image.csv"
    ok(heads, ["predict", world["results"] / "heads" / "image", world["info"].path, "--out", out, "--device", "cpu",
               "--workers", 0])
    _, predictions = read_predictions(out)
    info = world["info"]
    assert predictions[info.empty_title_id]["reason"] == ""
    assert predictions[info.missing_image_id]["reason"] == "missing image"
    assert predictions[info.corrupt_image_id]["reason"] == "unreadable image"
    assert len(predictions) == info.n_items


def test_mismatching_weights_and_bad_inputs_are_refused_in_one_line(world, tmp_path):
    head_dir = world["results"] / "heads" / "2A-concat"
    other = create_backbone("image", "tiny-resnet", image_size=64)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    common = ["--out", tmp_path / "p.csv", "--device", "cpu", "--workers", 0]
    result = invoke(heads, ["predict", head_dir, world["csv"], *common, "--image-weights",
                            tmp_path / "other.safetensors"])
    assert result.exit_code == 2 and "weights random-init" in result.output and "--image-weights" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "p.csv").exists()

    result = invoke(heads, ["predict", tmp_path / "no-head", world["csv"], *common])
    assert result.exit_code == 2 and "head folder not found" in result.output
    result = invoke(heads, ["predict", head_dir, world["csv"], *common, "--title-column", "name"])
    assert result.exit_code == 2 and "'name' not in" in result.output and "--title-column" in result.output

    # a head whose recorded preprocessing differs from what the backbone does now (another image size)
    edited = tmp_path / "edited"
    shutil.copytree(head_dir, edited)
    doc = json.loads((edited / "config.json").read_text())
    image_set = doc["inputs"][0]
    doc["store"]["feature_sets"][image_set]["preprocessing"]["resize"] = 1
    (edited / "config.json").write_text(json.dumps(doc))
    result = invoke(heads, ["predict", edited, world["csv"], *common])
    assert result.exit_code == 2 and "another preprocessing (resize differ)" in result.output


def test_a_1a_head_runs_its_modules(world, tmp_path):
    store = tmp_path / "store.h5"
    shutil.copy(world["store"], store)
    _, head_dir = s2_modules_and_a_1a_head(world["root"] / "manifest.json", store, tmp_path, "--epochs", 20)
    out = tmp_path / "pred.csv"
    ok(heads, ["predict", head_dir, world["csv"], "--out", out, "--top-k", TOP_K, "--device", "cpu",
               "--workers", 0])
    _, predictions = read_predictions(out)
    classes = json.loads((head_dir / "config.json").read_text())["classes"]
    test_ids = [item.id for item in world["test_items"]]
    assert_same_as_store(predictions, store_probabilities(store, head_dir), classes, test_ids)
    assert predictions["corrupt"]["reason"] == "unreadable image"

    # a module changed after the head was trained over it is refused
    weights = tmp_path / "text-s2" / "model.safetensors"   # the module s2_modules_and_a_1a_head made
    tensors = load_file(str(weights))
    tensors["head.dense.bias"] += 1.0
    save_file(tensors, str(weights))
    result = invoke(heads, ["predict", head_dir, world["csv"], "--out", tmp_path / "x.csv", "--device", "cpu"])
    assert result.exit_code == 2 and "not the one the head was trained over" in result.output


def test_a_3a_model_folder_predicts_straight_from_images_and_titles(world, tmp_path):
    """`heads predict` with a trained 3-A model: the CSV's probabilities are the loaded model's own outputs."""
    model_dir = tmp_path / "3A-concat" / "seed-0"
    settings = EndToEndSettings(image_backbone="tiny-resnet", text_backbone="tiny-bert", image_size=64, workers=0,
                                progress=False, batch_size=8, lr=3e-3, max_epochs=1, max_steps_per_epoch=2,
                                device="cpu")
    train_end_to_end(world["root"] / "manifest.json", model_dir, settings)
    out = tmp_path / "pred.csv"
    output = ok(heads, ["predict", model_dir, world["csv"], "--out", out, "--top-k", TOP_K, "--device", "cpu",
                        "--workers", 0])
    test_ids = [item.id for item in world["test_items"]]
    assert f"predicted {len(test_ids)} of {len(test_ids) + 3} rows" in output
    _, predictions = read_predictions(out)
    for item_id, reason in (("missing", "missing image"), ("corrupt", "unreadable image"), ("empty", "empty title")):
        assert predictions[item_id]["reason"] == reason

    model, config = load_end_to_end(model_dir)
    assert config["kind"] == "end-to-end" and config["settings"]["strategy"] == "3A"
    classes, catalog = config["classes"], open_catalog(world["info"].path)
    items = world["test_items"][:4]
    transform = model.image.backbone.image_transform(train=False)
    images = torch.stack([transform(Image.open(io.BytesIO(catalog.read_image_bytes(i.image))).convert("RGB"))
                          for i in items])  # (4, 3, 64, 64)
    with torch.inference_mode():
        expected = torch.softmax(model({"images": images, **model.text.backbone.tokenize([i.title for i in items])}),
                                 dim=-1).numpy()  # (4, C)
    assert_same_as_store(predictions, dict(zip([i.id for i in items], expected)), classes, [i.id for i in items])



def test_a_module_folder_is_no_model_for_predict(world, tmp_path):
    save_pretrained(tmp_path / "module", {"w": torch.zeros(1)}, {}, kind="module")
    result = invoke(heads, ["predict", tmp_path / "module", world["csv"], "--out", tmp_path / "p.csv"])
    assert result.exit_code == 2 and "holds a module model; `heads predict` takes a head" in result.output


def test_every_feature_set_records_its_compute_precision_and_predict_follows_it(world, tmp_path):
    """A store extracted under bf16 (a GPU's default) must be served in bf16 too, on any device: the head's recorded
    provenance says which, and predict's features follow it (here: a CPU told the store was bf16)."""
    with FeatureStore(world["store"]) as opened:
        assert {info.provenance["compute_precision"] for info in opened.feature_sets.values()} == {"fp32"}
    head_dir = tmp_path / "bf16-head"
    shutil.copytree(world["results"] / "heads" / "2A-concat", head_dir)
    config = json.loads((head_dir / "config.json").read_text())
    for provenance in config["store"]["feature_sets"].values():
        provenance["compute_precision"] = "bf16"
    config["store"]["path"] = str(world["store"])
    (head_dir / "config.json").write_text(json.dumps(config))
    args = ["--top-k", TOP_K, "--batch-size", 5, "--device", "cpu", "--workers", 0]
    ok(heads, ["predict", world["results"] / "heads" / "2A-concat", world["csv"], "--out", tmp_path / "fp32.csv", *args])
    ok(heads, ["predict", head_dir, world["csv"], "--out", tmp_path / "bf16.csv", *args])
    _, fp32 = read_predictions(tmp_path / "fp32.csv")
    _, bf16 = read_predictions(tmp_path / "bf16.csv")
    ids = [item.id for item in world["test_items"]]
    first = [float(fp32[i]["probability_1"]) for i in ids]
    second = [float(bf16[i]["probability_1"]) for i in ids]
    assert first != second                                  # the features were computed in another precision
    assert np.allclose(first, second, atol=0.05)           # ... and only as far apart as bf16 rounding takes them


@pytest.mark.parametrize("strategy", ["LF", "LR-text"])
def test_a_decision_level_model_predicts_from_raw_products_like_from_the_store(world, tmp_path, strategy):
    """LF / LR-* folders (kind "linear", heads/decision.py) run their recorded backbones on raw products and give
    the probabilities they give over the store's features."""
    from heads.decision_model import DecisionModel

    results = tmp_path / "results"
    ok(heads, ["sweep", world["store"], "--out", results, "--strategies", strategy, "--seeds", 0, "--no-baselines",
               "--device", "cpu"])
    model_dir = results / "heads" / strategy
    out = tmp_path / "pred.csv"
    ok(heads, ["predict", model_dir, world["csv"], "--out", out, "--top-k", TOP_K, "--device", "cpu",
               "--workers", 0])
    _, predictions = read_predictions(out)
    model = DecisionModel.from_pretrained(model_dir)
    with FeatureStore(world["store"]) as opened:
        data = opened.load(model.metadata["inputs"])
    expected = dict(zip(data.ids, model.predict_proba([data.features[n] for n in model.metadata["inputs"]])))
    test_ids = [item.id for item in world["test_items"]]
    assert_same_as_store(predictions, expected, list(model.classes), test_ids)
    if strategy == "LR-text":   # titles only: the missing and corrupt images do not matter
        assert predictions["missing"]["reason"] == "" and predictions["empty"]["reason"] == "empty title"
