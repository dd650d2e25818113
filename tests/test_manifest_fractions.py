"""`embed prepare --fractions`: every usable item, split per class by fractions, deterministic; fixed counts
stay the default."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from catalog_factory import make_fashion_catalog
from cli.embed import main
from embedstore.catalog import open_catalog
from embedstore.manifest import (FractionSettings, Manifest, SplitSettings, prepare_manifest, scaled_split,
                                 split_counts)

PER_CLASS = {"Tshirts": 23, "Watches": 9, "Casual Shoes": 4, "Belts": 2}   # imbalanced, like a real catalog
FRACTIONS = FractionSettings(fractions=(0.7, 0.1, 0.2), min_items=3, seed=0)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("fractions")
    return make_fashion_catalog(root, classes=tuple(PER_CLASS), per_class=PER_CLASS, as_zip=True, image_px=(16, 16))


@pytest.fixture(scope="module")
def manifest(fashion):
    return prepare_manifest(open_catalog(fashion.path), FRACTIONS)


@pytest.mark.parametrize("n, expected", [
    (3, (1, 1, 1)),          # a tiny class: one item per split, taken from train
    (4, (2, 1, 1)),
    (10, (7, 1, 2)),
    (101, (71, 10, 20)),     # 70.7 / 10.1 / 20.2: the one left over goes to the largest remainder (train)
])
def test_split_counts(n, expected):
    counts = split_counts(n, (0.7, 0.1, 0.2))
    assert tuple(counts.values()) == expected and sum(expected) == n


def test_split_counts_every_split_nonempty_and_sum():
    for n in range(3, 200):
        counts = split_counts(n, (0.8, 0.05, 0.15))
        assert sum(counts.values()) == n and min(counts.values()) >= 1


def test_keeps_every_usable_item_of_kept_classes(fashion, manifest):
    usable = fashion.usable_per_class
    kept = sorted(label for label, n in usable.items() if n >= 3)
    assert manifest.classes == kept and "Belts" not in kept
    for label in kept:
        members = [item for item in manifest.items if item.label == label]
        assert len(members) == usable[label]                                   # every usable item
        counts = {split: sum(item.split == split for item in members) for split in ("train", "val", "test")}
        assert counts == split_counts(usable[label], (0.7, 0.1, 0.2))           # stratified per class
    assert manifest.dropped["not sampled"] == 0
    assert manifest.small_classes == {"Belts": usable["Belts"]}
    assert sum(manifest.dropped.values()) + len(manifest.items) == fashion.n_rows


def test_max_per_class_caps_and_counts_the_rest(fashion):
    capped = prepare_manifest(open_catalog(fashion.path), FractionSettings(min_items=3, max_per_class=10))
    usable = fashion.usable_per_class
    per_class = {label: sum(item.label == label for item in capped.items) for label in capped.classes}
    assert per_class["Tshirts"] == 10 and per_class["Watches"] == min(10, usable["Watches"])
    assert capped.dropped["not sampled"] == sum(max(0, usable[c] - 10) for c in capped.classes) > 0
    assert sum(capped.dropped.values()) + len(capped.items) == fashion.n_rows


def test_deterministic_bytes_and_seed_sensitive(fashion, manifest, tmp_path):
    again = prepare_manifest(open_catalog(fashion.path), FRACTIONS)
    manifest.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    other = prepare_manifest(open_catalog(fashion.path), FractionSettings(min_items=3, seed=1))
    assert [(i.id, i.split) for i in other.items] != [(i.id, i.split) for i in manifest.items]
    assert sorted(i.id for i in other.items) == sorted(i.id for i in manifest.items)  # same items, other split


def test_round_trip_records_settings(manifest, tmp_path):
    path = tmp_path / "m.json"
    manifest.save(path)
    saved = json.loads(path.read_text())["settings"]
    assert saved == {"fractions": [0.7, 0.1, 0.2], "min_items": 3, "max_per_class": None, "seed": 0}
    loaded = Manifest.load(path)
    assert loaded == manifest and isinstance(loaded.settings, FractionSettings)


def test_fixed_count_settings_unchanged(fashion):
    """Fixed-count manifests keep exactly their old settings keys, so their bytes (and sha256) do not change."""
    fixed = prepare_manifest(open_catalog(fashion.path), SplitSettings(min_items=5, items_per_class=5, train=3,
                                                                       val=1, test=1))
    assert sorted(fixed.to_dict()["settings"]) == ["items_per_class", "min_items", "seed", "test", "train", "val"]
    assert isinstance(Manifest.from_dict(fixed.to_dict()).settings, SplitSettings)


@pytest.mark.parametrize("kwargs, message", [
    (dict(fractions=(0.7, 0.2, 0.2)), "summing to 1"),
    (dict(fractions=(0.9, 0.1)), "three numbers"),
    (dict(fractions=(1.0, 0.0, 0.0)), r"in \(0, 1\)"),
    (dict(min_items=2), "min_items = 2 must be at least 3"),
    (dict(max_per_class=5, min_items=10), "max_per_class = 5 must be >= min_items = 10"),
    (dict(min_items=3.5), "min_items must be an integer"),
])
def test_fraction_settings_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FractionSettings(**kwargs)


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_fractions(fashion, tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(main, ["prepare", str(fashion.path), "--out", str(out), "--fractions", "0.7,0.1,0.2",
                                       "--min-items", "3"])
    assert result.exit_code == 0, result.output
    assert "fractions 0.7,0.1,0.2" in result.output
    assert Manifest.load(out).settings == FRACTIONS


@pytest.mark.parametrize("args, message", [
    (["--fractions", "0.7,0.3"], "three numbers"),
    (["--fractions", "a,b,c"], "three comma-separated numbers"),
    (["--fractions", "0.7,0.1,0.2", "--train", "5"], "--train set fixed counts"),
    (["--max-per-class", "5"], "--max-per-class caps a class under --fractions"),
])
def test_cli_refuses_bad_combinations(fashion, tmp_path, args, message):
    result = CliRunner().invoke(main, ["prepare", str(fashion.path), "--out", str(tmp_path / "m.json")] + args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "m.json").exists()


# ----------------------------------------------------------------------------------------- real catalog
@pytest.mark.real
def test_real_catalog_whole():
    from pathlib import Path
    real_zip = Path(__file__).resolve().parents[1].parent / "shared/datasets/fashion-product-images-small.zip"
    if not real_zip.exists():
        pytest.skip(f"real catalog absent: {real_zip}")
    manifest = prepare_manifest(open_catalog(real_zip), FractionSettings(fractions=(0.7, 0.1, 0.2), min_items=20))
    assert len(manifest.classes) == 86 and len(manifest.items) == 43_661
    assert manifest.split_counts() == {"train": 30_551, "val": 4_368, "test": 8_742}
    assert manifest.dropped == {"malformed row": 0, "no image": 374, "empty title": 0, "class too small": 411,
                                "not sampled": 0}


# ------------------------------------------------------------------ --items-per-class N alone: the 7:1:2 split of N
@pytest.mark.parametrize("n, expected", [(250, (175, 25, 50)), (40, (28, 4, 8)), (10, (7, 1, 2)), (5, (3, 1, 1)),
                                         (3, (1, 1, 1)), (251, (176, 25, 50))])
def test_scaled_split_is_the_papers_ratio(n, expected):
    assert scaled_split(n) == expected


def test_scaled_split_needs_an_item_per_split():
    with pytest.raises(ValueError, match="2 items per class cannot be split 7:1:2"):
        scaled_split(2)


@pytest.mark.parametrize("args, expected", [
    (["--items-per-class", "10"], (7, 1, 2)),                                         # scaled, no arithmetic
    (["--items-per-class", "10", "--train", "5", "--val", "2", "--test", "3"], (5, 2, 3)),   # given counts win
    (["--items-per-class", "10", "--val", "0", "--test", "3"], (7, 0, 3)),           # the rest from 7:1:2
])
def test_cli_items_per_class_alone_scales_the_split(fashion, tmp_path, args, expected):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(main, ["prepare", str(fashion.path), "--out", str(out), "--min-items", "10"] + args)
    assert result.exit_code == 0, result.output
    train, val, test = expected
    assert Manifest.load(out).settings == SplitSettings(min_items=10, items_per_class=10, train=train, val=val,
                                                        test=test)


@pytest.mark.parametrize("args, message", [
    (["--items-per-class", "10", "--train", "5", "--val", "2", "--test", "2"],
     "5 + 2 + 2 = 9 must equal items_per_class = 10"),
    (["--items-per-class", "10", "--train", "8"], "8 + 1 + 2 = 11 must equal"),
    (["--items-per-class", "2", "--min-items", "2"], "2 items per class cannot be split 7:1:2"),
])
def test_cli_given_counts_must_add_up(fashion, tmp_path, args, message):
    result = CliRunner().invoke(main, ["prepare", str(fashion.path), "--out", str(tmp_path / "m.json"),
                                       "--min-items", "10"] + args)
    assert result.exit_code == 2 and message in result.output, result.output
