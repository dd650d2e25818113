"""Cross-fitted modules (`embed finetune --cross-fit K`, embedstore/cross_fit.py): fold modules never see their
fold, training rows get out-of-fold features and val/test rows the full module's, provenance and module ids,
bad K and changed manifests refused in one line, a killed run keeps its finished folds, `heads predict` over a
cross-fitted 1-A head. Tiny random backbones (tiny-resnet on 64 px images, tiny-bert) on a generated catalog."""
import csv
import json
import shutil
from collections import Counter

import h5py
import numpy as np
import pytest
import torch

import embedstore.finetune as finetune_module
from cli.embed import embed
from cli.heads import heads
from embedstore.cross_fit import assign_folds, fold_dir
from embedstore.extract import extract
from embedstore.extract_plan import ExtractSettings
from embedstore.finetune import FinetuneSettings, finetune
from embedstore.manifest import Manifest
from embedstore.model_folder import read_config
from embedstore.modules import load_module, module_id
from embedstore.store import FeatureStore
from embedstore.synthetic_catalog import make_fashion_catalog
from heads.estimator import FusionHead
from tests.cli_helpers import TINY, invoke, ok, s2_modules_and_a_1a_head

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny backbones: threads only add barriers

K = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A catalog (3 classes, 14 training items each), its manifest, a store of both tiny backbones' pooled
    features, and a CSV of the test items as new products."""
    root = tmp_path_factory.mktemp("cross_fit")
    info = make_fashion_catalog(root / "catalog", per_class=30, image_px=(48, 64))
    manifest_path, store = root / "manifest.json", root / "store.h5"
    ok(embed, ["prepare", info.path, "--out", manifest_path, "--min-items", 24, "--items-per-class", 24,
               "--train", 14, "--val", 4, "--test", 6])
    ok(embed, ["extract", manifest_path, "--store", store, *TINY])
    manifest = Manifest.load(manifest_path)
    test_items = [item for item in manifest.items_in("test") if item.id != info.corrupt_image_id]
    products = root / "products.csv"
    lines = ["id,title,image"] + [f"{item.id},{item.title.replace(',', ' ')},{info.path}/{item.image}"
                                  for item in test_items]
    products.write_text("\n".join(lines) + "\n")
    return {"root": root, "manifest_path": manifest_path, "manifest": manifest, "store": store,
            "products": products, "test_ids": [item.id for item in test_items]}


def settings(**options) -> FinetuneSettings:
    base = dict(modality="image", strategy=2, backbone="tiny-resnet", image_size=64, lr=1e-2, max_epochs=4,
                patience=10, seed=0, device="cpu", workers=0, progress=False)
    return FinetuneSettings(**{**base, **options})


@pytest.fixture
def seen(monkeypatch):
    """The training item ids of each module fitted, in order, recorded where fit() is called."""
    record = []
    real_fit = finetune_module.fit

    def spy(model, data, *args, **kwargs):
        record.append(list(data.train_ids))
        return real_fit(model, data, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "fit", spy)
    return record


def test_fold_modules_never_see_their_fold(world, tmp_path, seen):
    out = tmp_path / "image-cf"
    finetune(world["manifest_path"], out, settings(cross_fit=K), store_path=world["store"])
    train_ids = {item.id for item in world["manifest"].items_in("train")}
    folds = read_config(out)["cross_fit"]["folds"]
    assert set(folds) == train_ids and set(folds.values()) == set(range(K))
    labels = {item.id: item.label for item in world["manifest"].items}
    for label in set(labels.values()):  # stratified: each class spread evenly over the folds
        per_fold = Counter(f for item, f in folds.items() if labels[item] == label)
        assert max(per_fold.values()) - min(per_fold.values()) <= 1
    # trained in order: fold 0 .. K-1, then the full module
    for fold in range(K):
        held_out = {item for item, f in folds.items() if f == fold}
        assert set(seen[fold]) == train_ids - held_out and not held_out & set(seen[fold])
        config = read_config(fold_dir(out, fold))
        assert config["cross_fit_fold"]["fold"] == fold and config["metrics"]["items"]["train"] == len(train_ids) - len(held_out)
    assert set(seen[K]) == train_ids and len(seen) == K + 1
    assert folds == assign_folds(world["manifest"], K, 0)  # the seed draws the same folds again


def test_train_rows_get_out_of_fold_features_and_val_test_the_full_modules(world, tmp_path):
    plain, crossed = tmp_path / "plain", tmp_path / "crossed"
    finetune(world["manifest_path"], plain, settings(), store_path=world["store"])
    finetune(world["manifest_path"], crossed, settings(cross_fit=K), store_path=world["store"])
    # the same seed and items: the full module is the plain one, yet its id (the store's source) differs
    assert torch.equal(load_module(plain)[0].head.dense.weight, load_module(crossed)[0].head.dense.weight)
    assert module_id(plain) != module_id(crossed)
    store = tmp_path / "store.h5"
    shutil.copy(world["store"], store)
    extract(world["manifest_path"], store, ExtractSettings(image_backbone=None, text_backbone=None,
                                                           image_module=str(crossed), progress=False, workers=0))
    source = f"module-{module_id(crossed)}"
    with h5py.File(store, "r") as f:
        assert f[f"features/image/{source}/dense"].attrs["cross_fit"] == K
    folds = read_config(crossed)["cross_fit"]["folds"]
    modules = {fold: load_module(fold_dir(crossed, fold))[0] for fold in range(K)} | {None: load_module(crossed)[0]}
    with FeatureStore(store) as opened:
        pooled_name = opened.find("image", "pooled")
        data = opened.load([pooled_name, f"image/{source}/dense", f"image/{source}/classifier"])
    outputs = {key: module.head.forward_features(torch.from_numpy(data.features[pooled_name]))
               for key, module in modules.items()}
    checked = Counter()
    for row, (item_id, split) in enumerate(zip(data.ids, data.split)):
        key = folds[item_id] if split == "train" else None
        for layer in ("dense", "classifier"):
            expected = outputs[key][layer][row].detach().numpy()
            np.testing.assert_allclose(data.features[f"image/{source}/{layer}"][row], expected, rtol=1e-5, atol=1e-5)
        # ... and not the full module's, for training rows (the point of cross-fitting)
        if key is not None:
            assert not np.allclose(data.features[f"image/{source}/classifier"][row],
                                   outputs[None]["classifier"][row].detach().numpy(), atol=1e-4)
        checked[split] += 1
    assert checked["train"] == len(folds) and checked["val"] and checked["test"]

    # a training item that no fold holds (a changed manifest): one line naming it, nothing written
    config = json.loads((crossed / "config.json").read_text())
    missing = sorted(config["cross_fit"]["folds"])[0]
    del config["cross_fit"]["folds"][missing]
    (crossed / "config.json").write_text(json.dumps(config))
    other = tmp_path / "other.h5"
    shutil.copy(world["store"], other)
    with pytest.raises(ValueError, match=f"training item '{missing}' is in no fold"):
        extract(world["manifest_path"], other, ExtractSettings(image_backbone=None, text_backbone=None,
                                                               image_module=str(crossed), progress=False))
    with FeatureStore(other) as opened:
        assert not any("module-" in name for name in opened.feature_sets)


def test_s3_cross_fit_streams_each_training_row_through_its_fold_module(world, tmp_path):
    out = tmp_path / "text-s3"
    finetune(world["manifest_path"], out, settings(modality="text", strategy=3, backbone="tiny-bert", lr=3e-3,
                                                   max_epochs=1, cross_fit=2), store_path=world["store"])
    # S3 trains the backbone: every fold starts from the same pretrained (here: seeded random) backbone
    assert (fold_dir(out, 0) / "checkpoint.json").is_file() and (out / "checkpoint.json").is_file()
    store = tmp_path / "store.h5"
    shutil.copy(world["store"], store)
    extract(world["manifest_path"], store, ExtractSettings(image_backbone=None, text_backbone=None,
                                                           text_module=str(out), progress=False))
    folds = read_config(out)["cross_fit"]["folds"]
    modules = {fold: load_module(fold_dir(out, fold))[0] for fold in range(2)} | {None: load_module(out)[0]}
    items = {item.id: item for item in world["manifest"].items}
    with FeatureStore(store) as opened:
        name = opened.find("text", "classifier")
        assert opened.feature_sets[name].provenance["cross_fit"] == 2
        data = opened.load([name])
    for row in range(0, len(data.ids), 5):
        item = items[data.ids[row]]
        module = modules[folds[item.id] if item.split == "train" else None]
        with torch.inference_mode():
            expected = module.forward_features(module.backbone.tokenize([item.title]))["classifier"][0].numpy()
        np.testing.assert_allclose(data.features[name][row], expected, rtol=1e-4, atol=1e-4)


def test_a_bad_k_is_refused_in_one_line_before_any_training(world, tmp_path):
    for k, message in ((1, "--cross-fit must be an integer of at least 2"), (15, "class '.*' has 14")):
        with pytest.raises(ValueError, match=message):
            finetune(world["manifest_path"], tmp_path / f"k{k}", settings(cross_fit=k), store_path=world["store"])
        assert not (tmp_path / f"k{k}").exists()
    result = invoke(embed, ["finetune", world["manifest_path"], "--modality", "image", "--strategy", 2, "--backbone",
                            "tiny-resnet", "--image-size", 64, "--store", world["store"], "--out", tmp_path / "x",
                            "--cross-fit", 15, "--no-progress"])
    assert result.exit_code == 2 and "at most 14" in result.output and "Traceback" not in result.output


class Killed(Exception):
    """Stands for a kill in the middle of a run (a real KeyboardInterrupt would stop pytest itself)."""


def test_a_killed_cross_fit_keeps_its_finished_folds(world, tmp_path, monkeypatch):
    out = tmp_path / "image-cf"
    # private: the kill must land between folds, and _finetune (one fold's training) is where a fold starts
    real, calls, kill_at = finetune_module._finetune, [], [3]

    def dies_on_third(manifest, folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) in kill_at:
            kill_at.clear()  # one kill only
            raise Killed  # killed while training fold 2
        return real(manifest, folder, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "_finetune", dies_on_third)
    with pytest.raises(Killed):
        finetune(world["manifest_path"], out, settings(cross_fit=K), store_path=world["store"])
    assert not (out / "config.json").exists()  # the full module comes last: the folder is unfinished
    kept = {fold: (fold_dir(out, fold) / "model.safetensors").stat().st_ino for fold in (0, 1)}
    calls.clear()
    result = finetune(world["manifest_path"], out, settings(cross_fit=K), store_path=world["store"])
    assert calls == [fold_dir(out, 2), out]  # only the unfinished fold and the full module trained
    assert [f["kept"] for f in result.metrics["cross_fit"]["folds"]] == [True, True, False]
    assert {fold: (fold_dir(out, fold) / "model.safetensors").stat().st_ino for fold in (0, 1)} == kept
    # another K draws other folds: none is kept
    calls.clear()
    finetune(world["manifest_path"], out, settings(cross_fit=2), store_path=world["store"])
    assert calls == [fold_dir(out, 0), fold_dir(out, 1), out]


def test_heads_predict_over_a_cross_fitted_1a_head_uses_the_full_modules(world, tmp_path):
    store = tmp_path / "store.h5"
    shutil.copy(world["store"], store)
    outputs, head_dir = s2_modules_and_a_1a_head(world["manifest_path"], store, tmp_path, "--epochs", 5,
                                                 "--cross-fit", 2)
    for output in outputs.values():
        assert "fold 1: trained" in output and "2 fold modules" in output
    out = tmp_path / "pred.csv"
    ok(heads, ["predict", head_dir, world["products"], "--out", out, "--device", "cpu", "--workers", 0])
    head = FusionHead.from_pretrained(head_dir)
    with FeatureStore(store) as opened:
        data = opened.load(head.metadata_["inputs"])
    expected = dict(zip(data.ids, head.predict([data.features[n] for n in head.metadata_["inputs"]])))
    with open(out, newline="") as handle:
        predicted = {row["id"]: row["label_1"] for row in csv.DictReader(handle)}
    # new products go through the full modules, which made the store's test rows
    assert [predicted[i] for i in world["test_ids"]] == [expected[i] for i in world["test_ids"]]
