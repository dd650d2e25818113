"""Modules with three transfer strategies: freezing, cached-vs-backbone equality, saving, S3 resume, module
features in the store, and the CLI. Tiny random backbones on 32 px images and generated catalogs."""
import io
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from cli.embed import embed
from embedstore.backbones import create_backbone
from embedstore.catalog import open_catalog
from embedstore.extract import extract
from embedstore.extract_plan import ExtractSettings
from embedstore.finetune import FinetuneSettings, finetune
from embedstore.manifest import SplitSettings, prepare_manifest
from embedstore.modules import build_module, load_module, module_id
from embedstore.store import STATUS_OK, FeatureStore
from heads.estimator import FusionHead
from tests.catalog_factory import make_fashion_catalog

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny backbones: threads only add barriers

SIZE = 32  # image crop: tiny-resnet on small images keeps every test fast
QUICK = dict(workers=0, progress=False, image_size=SIZE, batch_size=16)


def tiny_resnet():
    """tiny-resnet has random weights ("random-init"); seeding makes every call build the same backbone, so a
    store extracted by one call and a module built by another see the same features."""
    torch.manual_seed(0)
    return create_backbone("image", "tiny-resnet", image_size=SIZE)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A generated catalog, its manifest, a saved tiny-bert folder (a real weights_id) and a store with the
    pooled features of both tiny backbones."""
    root = tmp_path_factory.mktemp("modules")
    info = make_fashion_catalog(root / "catalog", per_class=30, as_zip=True)
    manifest = prepare_manifest(open_catalog(info.path), SplitSettings(min_items=24, items_per_class=24, train=14,
                                                                       val=4, test=6, seed=0))
    manifest.save(root / "manifest.json")
    text = create_backbone("text", "tiny-bert")
    text.model.save_pretrained(root / "tiny-bert")
    text.tokenizer.save_pretrained(root / "tiny-bert")
    store = root / "store.h5"
    torch.manual_seed(0)  # the same random tiny-resnet as tiny_resnet()
    extract(root / "manifest.json", store, ExtractSettings(image_backbone="tiny-resnet", text_backbone=None,
                                                           image_size=SIZE, workers=0, progress=False))
    extract(root / "manifest.json", store, ExtractSettings(image_backbone=None, text_backbone="tiny-bert",
                                                           text_weights=str(root / "tiny-bert"), add=True,
                                                           progress=False))
    return {"root": root, "info": info, "manifest": manifest, "manifest_path": root / "manifest.json",
            "store": store, "bert": str(root / "tiny-bert")}


def train(world, out, modality, strategy, **options):
    settings = dict(QUICK, modality=modality, strategy=strategy, seed=0, patience=10)
    if modality == "text":
        settings.update(backbone="tiny-bert", weights=world["bert"], lr=1e-2 if strategy < 3 else 3e-3,
                        max_epochs=40 if strategy < 3 else 6)
    else:
        settings.update(backbone="tiny-resnet", lr=1e-2 if strategy < 3 else 1e-3, max_epochs=30 if strategy < 3 else 3)
    settings.update(options)
    backbone = tiny_resnet() if modality == "image" else None
    return finetune(world["manifest_path"], out, FinetuneSettings(**settings), store_path=world["store"],
                    backbone=backbone)


def test_module_shapes_strategies_and_parameter_counts():
    for strategy in (1, 2, 3):
        module = build_module("image", strategy, 5, backbone=tiny_resnet())
        features = module.eval().forward_features(torch.randn(2, 3, SIZE, SIZE))
        assert features["pooled"].shape == (2, 512) and features["classifier"].shape == (2, 5)
        assert ("dense" in features) == (strategy > 1)
        if strategy > 1:
            assert features["dense"].shape == (2, 500) and (features["dense"] >= 0).all()  # after ReLU
        counts = module.parameter_counts()
        head = 512 * 5 + 5 if strategy == 1 else 512 * 500 + 500 + 500 * 5 + 5
        backbone = sum(p.numel() for p in module.backbone.parameters())
        expected = (head, backbone) if strategy < 3 else (head + backbone, 0)
        assert (counts["trainable"], counts["non_trainable"]) == expected
    with pytest.raises(ValueError, match="transfer strategy"):
        build_module("image", 4, 5, backbone=tiny_resnet())


def test_frozen_backbone_stays_bit_identical_even_trained_through(world):
    module = build_module("image", 2, 3, backbone=tiny_resnet())
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}  # batch-norm statistics included
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    assert not module.backbone.training and module.head.training
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(module(torch.randn(4, 3, SIZE, SIZE)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = module.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_s1_s2_keep_the_backbone_and_s3_changes_it(world, tmp_path):
    original = tiny_resnet().state_dict()
    for strategy in (1, 2, 3):
        # one step is enough: S3's first step changes the backbone; S1/S2's would already move batch-norm
        # statistics (state_dict) if the backbone were left in training mode or given to the optimizer
        train(world, tmp_path / f"s{strategy}", "image", strategy, max_epochs=1, max_steps_per_epoch=1)
        module, config = load_module(tmp_path / f"s{strategy}")
        changed = [k for k, v in module.backbone.state_dict().items() if not torch.equal(v, original[k])]
        assert (len(changed) > 0) == (strategy == 3), strategy
        assert config["strategy"] == strategy and config["manifest_sha256"] == world["manifest"].sha256


def _images(world, module, rows):
    catalog, transform = open_catalog(world["info"].path), module.backbone.image_transform(train=False)
    items = [world["manifest"].items[row] for row in rows]
    return torch.stack([transform(Image.open(io.BytesIO(catalog.read_image_bytes(item.image))).convert("RGB"))
                        for item in items])  # (n, 3, H, W)


def test_cached_training_matches_the_backbone_and_save_load_round_trips(world, tmp_path):
    result = train(world, tmp_path / "image-s2", "image", 2)
    module, _ = load_module(tmp_path / "image-s2")
    with FeatureStore(world["store"]) as store:
        name = store.find("image", "pooled")
        ok = np.flatnonzero(store.status(name) == STATUS_OK)[:12]
        pooled = torch.from_numpy(store.load([name]).features[name][:12])  # (12, 512), rows `ok`
    with torch.inference_mode():
        through_backbone = module.forward_features(_images(world, module, ok))
        from_cache = module.head.forward_features(pooled)
        again = load_module(tmp_path / "image-s2")[0].head.forward_features(pooled)
    for layer in ("dense", "classifier"):
        torch.testing.assert_close(through_backbone[layer], from_cache[layer], rtol=1e-4, atol=1e-4)
        assert torch.equal(again[layer], from_cache[layer])
    assert torch.equal(through_backbone["classifier"].argmax(1), from_cache["classifier"].argmax(1))
    saved = json.loads((tmp_path / "image-s2" / "config.json").read_text())
    assert saved["metrics"]["test_accuracy"] == result.metrics["test_accuracy"]
    assert (saved["format"], saved["format_version"], saved["kind"]) == ("embedstore-model", 1, "module")
    assert json.loads((tmp_path / "image-s2" / "metrics.json").read_text())["test_accuracy"] == \
        result.metrics["test_accuracy"]
    # a module folder written before the one convention (format "embedstore-module") still loads, the same
    old = tmp_path / "old-format"
    shutil.copytree(tmp_path / "image-s2", old)
    legacy = {k: v for k, v in saved.items() if k != "kind"}
    (old / "config.json").write_text(json.dumps({**legacy, "format": "embedstore-module"}))
    with torch.inference_mode():
        assert torch.equal(load_module(old)[0].head.forward_features(pooled)["classifier"], from_cache["classifier"])
    assert module_id(old) == module_id(tmp_path / "image-s2")
    with pytest.raises(ValueError, match="holds a module model, not a fusion-head"):
        FusionHead.from_pretrained(old)
    assert set(load_file(str(tmp_path / "image-s2" / "model.safetensors"))) >= {"head.dense.weight",
                                                                                 "head.classifier.weight"}


def test_text_s2_saves_only_the_head_and_refuses_other_backbone_weights(world, tmp_path):
    train(world, tmp_path / "text-s2", "text", 2, max_epochs=2)
    assert all(k.startswith("head.") for k in load_file(str(tmp_path / "text-s2" / "model.safetensors")))
    config = json.loads((tmp_path / "text-s2" / "config.json").read_text())
    config["backbone"]["weights_id"] = "tiny-bert:0000000000000000"
    (tmp_path / "text-s2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="original weights"):
        load_module(tmp_path / "text-s2")


def test_s3_resumes_after_an_interruption_like_an_uninterrupted_run(world, tmp_path):
    # two epochs, stopped after the first: the second epoch after a resume (its shuffle, the restored Adam state)
    # must be the uninterrupted run's second epoch
    whole = train(world, tmp_path / "whole", "text", 3, max_epochs=2, patience=10).metrics
    first = train(world, tmp_path / "split", "text", 3, max_epochs=1, patience=10).metrics
    assert first["epochs"] == 1
    resumed = train(world, tmp_path / "split", "text", 3, max_epochs=2, patience=10).metrics
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs"] == whole["epochs"] == 2
    assert [h["val_accuracy"] for h in resumed["history"]] == [h["val_accuracy"] for h in whole["history"]]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]
    a, b = (load_file(str(tmp_path / name / "checkpoint.safetensors")) for name in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # last weights and Adam moments
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lr="):
        train(world, tmp_path / "split", "text", 3, max_epochs=4, lr=1e-4)


@pytest.mark.parametrize("modality,strategy", [(m, s) for m in ("image", "text") for s in (1, 2, 3)])
def test_every_strategy_learns_well_above_chance(world, tmp_path, modality, strategy):
    metrics = train(world, tmp_path / "m", modality, strategy).metrics
    assert metrics["test_accuracy"] >= 0.6, metrics["history"]  # chance is 1/3
    assert 0 < metrics["test_macro_f1"] <= 1 and metrics["best_epoch"] <= metrics["epochs"]
    assert metrics["trainable_parameters"] > 0 and metrics["training_seconds"] > 0


def test_module_features_go_into_the_store_with_provenance(world, tmp_path):
    image_dir, text_dir = tmp_path / "image-s2", tmp_path / "text-s1"
    train(world, image_dir, "image", 2, max_epochs=2)
    train(world, text_dir, "text", 1, max_epochs=2)
    store = tmp_path / "store.h5"
    store.write_bytes(world["store"].read_bytes())
    reports = extract(world["manifest_path"], store, ExtractSettings(
        image_backbone=None, text_backbone=None, image_module=str(image_dir), text_module=str(text_dir), **QUICK))
    assert all(r.complete for r in reports)
    n, classes = len(world["manifest"].items), len(world["manifest"].classes)
    image_source = f"module-{module_id(image_dir)}"
    with h5py.File(store, "r") as f:
        dense = f[f"features/image/{image_source}/dense"]
        assert dense.shape == (n, 500) and f[f"features/image/{image_source}/classifier"].shape == (n, classes)
        assert dense.attrs["module_strategy"] == 2 and dense.attrs["module_dir"] == str(image_dir.resolve())
        assert dense.attrs["manifest_sha256"] == world["manifest"].sha256 and dense.attrs["complete"]
        assert dense.attrs["parameters"] > 500 * 512 and "module_config_sha256" in dense.attrs
        assert f"features/text/module-{module_id(text_dir)}/classifier" in f
        assert f"features/text/module-{module_id(text_dir)}/dense" not in f  # S1 has no middle layer
    with FeatureStore(store) as opened:
        fast = opened.load([opened.find("image", "dense"), opened.find("image", "classifier")])
        text_classifier = opened.load([opened.find("text", "classifier")]).features

    # The same module through its backbone (a store without its pooled features) writes the same values.
    slow_store = tmp_path / "slow.h5"
    extract(world["manifest_path"], slow_store, ExtractSettings(image_backbone=None, text_backbone=None,
                                                                image_module=str(image_dir), **QUICK))
    with FeatureStore(slow_store) as opened:
        slow = opened.load([opened.find("image", "dense"), opened.find("image", "classifier")])
    assert list(slow.ids) == list(fast.ids)
    for name in fast.features:
        np.testing.assert_allclose(slow.features[name], fast.features[name], rtol=1e-4, atol=1e-4)
    assert all(matrix.shape[1] == classes for matrix in text_classifier.values())


def test_a_module_of_another_manifest_is_refused(world, tmp_path):
    train(world, tmp_path / "text-s1", "text", 1, max_epochs=1)
    other = prepare_manifest(open_catalog(world["info"].path), SplitSettings(min_items=24, items_per_class=24,
                                                                             train=14, val=4, test=6, seed=1))
    other.save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="another manifest"):
        extract(tmp_path / "other.json", tmp_path / "other.h5", ExtractSettings(
            image_backbone=None, text_backbone=None, text_module=str(tmp_path / "text-s1"), progress=False))
    assert not (tmp_path / "other.h5").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="is a text module"):
        extract(world["manifest_path"], tmp_path / "x.h5", ExtractSettings(
            image_backbone=None, text_backbone=None, image_module=str(tmp_path / "text-s1"), progress=False))


def test_cli_finetune_and_extract_modules(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "text-s2"
    common = [str(world["manifest_path"]), "--modality", "text", "--backbone", "tiny-bert", "--weights",
              world["bert"], "--epochs", "3", "--lr", "0.01", "--no-progress"]
    result = runner.invoke(embed, ["finetune", *common, "--strategy", "2", "--out", str(out),
                                   "--store", str(world["store"])])
    assert result.exit_code == 0, result.output
    for column in ("test accuracy", "macro-F1", "training time", "epochs", "trainable parameters",
                   "non-trainable parameters"):
        assert column in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == 2 and metrics["non_trainable_parameters"] > 0
    # counts in words ("items train: 42, val: 12, test: 18"), not a Python dict
    assert all(f"{split}: {n}" in result.output for split, n in metrics["items"].items())
    assert "{" not in result.output
    assert not (out / "checkpoint.json").exists()  # S1/S2: seconds of training, nothing to resume

    result = runner.invoke(embed, ["finetune", *common, "--strategy", "1", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--store" in result.output

    store = tmp_path / "store.h5"
    store.write_bytes(world["store"].read_bytes())
    result = runner.invoke(embed, ["extract", str(world["manifest_path"]), "--store", str(store),
                                   "--text-module", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"text/module-{module_id(out)}: computed" in result.output
    assert "tiny-resnet" not in result.output  # backbones run only when named
    result = runner.invoke(embed, ["extract", str(world["manifest_path"]), "--store", str(store),
                                   "--image-module", str(out), "--no-progress"])
    assert result.exit_code == 2 and "text module" in result.output
