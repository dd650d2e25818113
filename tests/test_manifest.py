"""Manifests: usable items, under-sampling, splits, drop counts, determinism, save/load, the real protocol."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from catalog_factory import make_fashion_catalog
from embedstore.catalog import open_catalog
from embedstore.manifest import (DROP_REASONS, Manifest, SplitSettings, format_summary, natural_key,
                                 prepare_manifest)

REAL_ZIP = Path(__file__).resolve().parents[1].parent / "shared/datasets/fashion-product-images-small.zip"
SMALL = SplitSettings(min_items=10, items_per_class=10, train=6, val=2, test=2, seed=0)
PER_CLASS = {"Tshirts": 14, "Watches": 11, "Casual Shoes": 12, "Belts": 6}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    return make_fashion_catalog(root, classes=tuple(PER_CLASS), per_class=PER_CLASS, as_zip=True)


@pytest.fixture(scope="module")
def manifest(fashion):
    return prepare_manifest(open_catalog(fashion.path), SMALL)


# --------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kwargs, message", [
    (dict(train=100), "must equal items_per_class"),
    (dict(min_items=200), "min_items = 200 must be >= items_per_class"),
    (dict(test=0, train=225), "test must be at least 1"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(train=175.0), "train must be an integer"),
])
def test_settings_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SplitSettings(**kwargs)


def test_settings_defaults_are_the_protocol():
    assert SplitSettings() == SplitSettings(min_items=250, items_per_class=250, train=175, val=25, test=50, seed=0)


# ------------------------------------------------------------------------------------------- preparation
def test_classes_and_split_sizes(manifest):
    assert manifest.classes == ["Casual Shoes", "Tshirts", "Watches"]  # Belts too small; sorted by name
    assert manifest.split_counts() == {"train": 18, "val": 6, "test": 6}
    for label in manifest.classes:
        splits = [item.split for item in manifest.items if item.label == label]
        assert splits == ["train"] * 6 + ["val"] * 2 + ["test"] * 2  # documented order


def test_items_order_is_class_split_natural_id(manifest):
    keys = [(manifest.label_index[i.label], ("train", "val", "test").index(i.split), natural_key(i.id))
            for i in manifest.items]
    assert keys == sorted(keys)
    assert natural_key("9") < natural_key("10") < natural_key("abc")


def test_only_usable_items_drawn(fashion, manifest):
    ids = {item.id for item in manifest.items}
    assert fashion.missing_image_id not in ids and fashion.empty_title_id not in ids
    assert len(ids) == len(manifest.items)
    assert all(item.title and item.image == f"images/{item.id}.jpg" for item in manifest.items)


def test_drop_counts_account_for_every_row(fashion, manifest):
    usable = fashion.usable_per_class
    assert manifest.dropped == {
        "malformed row": 1, "no image": 1, "empty title": 1,
        "class too small": usable["Belts"],
        "not sampled": sum(usable[label] - 10 for label in manifest.classes),
    }
    assert manifest.small_classes == {"Belts": usable["Belts"]}
    assert sum(manifest.dropped.values()) + len(manifest.items) == fashion.n_rows
    assert manifest.malformed[0][0] == fashion.malformed_lines[0]


def test_summary_names_every_reason(manifest):
    summary = format_summary(manifest)
    assert "3 classes kept, 30 items: 18 train / 6 val / 6 test" in summary
    for reason in DROP_REASONS:
        assert f"{reason}: {manifest.dropped[reason]}" in summary
    assert "in 1 classes (largest: Belts" in summary


def test_labels_array(manifest):
    labels = manifest.labels()
    assert labels.dtype == np.int64 and labels.shape == (30,)
    assert [manifest.classes[i] for i in labels] == [item.label for item in manifest.items]


def test_shrinking_train_keeps_val_and_test(fashion, manifest):
    smaller = prepare_manifest(open_catalog(fashion.path),
                               SplitSettings(min_items=10, items_per_class=7, train=3, val=2, test=2))
    for split in ("val", "test"):
        assert smaller.items_in(split) == manifest.items_in(split)


# ------------------------------------------------------------------------------------------ determinism
def test_byte_identical_and_seed_sensitive(fashion, manifest, tmp_path):
    again = prepare_manifest(open_catalog(fashion.path), SMALL)
    manifest.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    data = (tmp_path / "a.json").read_bytes()
    assert data == (tmp_path / "b.json").read_bytes() and data.endswith(b"}\n")
    assert manifest.sha256 == again.sha256
    other = prepare_manifest(open_catalog(fashion.path), SplitSettings(**{**SMALL.__dict__, "seed": 1}))
    assert other.sha256 != manifest.sha256
    assert [i.id for i in other.items] != [i.id for i in manifest.items]


def test_same_bytes_from_folder_and_zip_except_catalog(tmp_path):
    folder = make_fashion_catalog(tmp_path / "a", per_class=11, seed=3)
    zipped = make_fashion_catalog(tmp_path / "b", per_class=11, seed=3, as_zip=True)
    settings = SplitSettings(min_items=10, items_per_class=10, train=6, val=2, test=2)
    a = prepare_manifest(open_catalog(folder.path), settings)
    b = prepare_manifest(open_catalog(zipped.path), settings)
    assert a.items == b.items and a.catalog != b.catalog


# ------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(manifest, tmp_path):
    path = tmp_path / "manifest.json"
    manifest.save(path)
    loaded = Manifest.load(path)
    assert loaded == manifest
    assert loaded.sha256 == manifest.sha256
    assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.open_catalog().spec() == manifest.catalog


def test_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found.*embed prepare"):
        Manifest.load(tmp_path / "nope.json")


def _corrupt(manifest, tmp_path, change) -> Path:
    data = manifest.to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="something"), "'format' is not 'embedstore-manifest'"),
    (lambda d: d.pop("items"), "missing key"),
    (lambda d: d["items"][0].update(split="holdout"), "split 'holdout'"),
    (lambda d: d["items"][0].update(label="Sarees"), "label 'Sarees'"),
    (lambda d: d["items"].append(dict(d["items"][0])), "duplicate item ids"),
    (lambda d: d["settings"].update(train=1), "settings: train"),
    (lambda d: d["classes"].reverse(), "sorted list"),
])
def test_load_rejects_malformed(manifest, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        Manifest.load(_corrupt(manifest, tmp_path, change))


def test_load_rejects_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": ')
    with pytest.raises(ValueError, match="is not a manifest .invalid JSON"):
        Manifest.load(path)


# ----------------------------------------------------------------------------------------- real catalog
@pytest.mark.real
def test_real_protocol_manifest(tmp_path):
    if not REAL_ZIP.exists():
        pytest.skip(f"real catalog absent: {REAL_ZIP}")
    manifest = prepare_manifest(open_catalog(REAL_ZIP))
    assert len(manifest.classes) == 37
    assert manifest.split_counts() == {"train": 6_475, "val": 925, "test": 1_850}
    assert manifest.dropped["no image"] == 374 and manifest.dropped["malformed row"] == 0
    assert manifest.small_classes["Innerwear Vests"] == 242
    assert sum(manifest.dropped.values()) + len(manifest.items) == 44_446
    manifest.save(tmp_path / "m.json")
    assert Manifest.load(tmp_path / "m.json").sha256 == manifest.sha256
