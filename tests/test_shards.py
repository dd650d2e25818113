"""Sharded extraction (in-process and under torchrun) and `embed merge` into a store of virtual datasets."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli.embed import embed
from embedstore.catalog import open_catalog
from embedstore.extract import extract
from embedstore.extract_plan import ExtractSettings
from embedstore.manifest import SplitSettings, prepare_manifest
from embedstore.shards import Shard, merge_shards, parse_shard
from embedstore.store import STATUS_OK, FeatureStore
from embedstore.store_writer import FeatureSetWriter, create_store
from tests.catalog_factory import make_fashion_catalog

TINY = dict(image_backbone="tiny-resnet", text_backbone="tiny-bert", image_size=64, progress=False,
            batch_size=4, workers=0)
SETS = ("image/tiny-resnet-64px", "text/tiny-bert")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """A 3-class catalog of 30 items (with a corrupt image) and its single-process extraction."""
    root = tmp_path_factory.mktemp("whole")
    info = make_fashion_catalog(root / "catalog", per_class=12, as_zip=False)
    settings = SplitSettings(min_items=10, items_per_class=10, train=6, val=2, test=2, seed=0)
    manifest = prepare_manifest(open_catalog(info.path), settings)
    manifest.save(root / "manifest.json")
    extract(root / "manifest.json", root / "whole.h5", ExtractSettings(**TINY))
    return root / "manifest.json", root / "whole.h5"


def assert_same_store(merged: Path, whole: Path) -> None:
    with h5py.File(merged, "r", locking=False) as m, h5py.File(whole, "r", locking=False) as w:
        for column in ("id", "split"):
            assert m[f"items/{column}"].asstr()[:].tolist() == w[f"items/{column}"].asstr()[:].tolist()
        np.testing.assert_array_equal(m["items/label"][:], w["items/label"][:])
        assert m["classes"].asstr()[:].tolist() == w["classes"].asstr()[:].tolist()
        for name in SETS:
            np.testing.assert_array_equal(m[f"features/{name}/status"][:], w[f"features/{name}/status"][:])
            np.testing.assert_allclose(m[f"features/{name}/pooled"][:], w[f"features/{name}/pooled"][:],
                                       rtol=1e-5, atol=1e-6, equal_nan=True)
            assert m[f"features/{name}/pooled"].attrs["complete"]
    with FeatureStore(merged) as m, FeatureStore(whole) as w:
        assert m.manifest_sha256 == w.manifest_sha256
        assert {n: i.counts for n, i in m.feature_sets.items()} == {n: i.counts for n, i in w.feature_sets.items()}
        names = [m.find("image", "pooled"), m.find("text", "pooled")]
        loaded, expected = m.load(names), w.load(names)
        assert loaded.ids.tolist() == expected.ids.tolist() and loaded.skipped == expected.skipped == 1
        for name in names:
            np.testing.assert_allclose(loaded.features[name], expected.features[name], rtol=1e-5, atol=1e-6)


def test_shards_merge_into_the_single_process_store_without_copying(whole, tmp_path):
    manifest_path, whole_path = whole
    for k in range(2):
        extract(manifest_path, tmp_path / "store.h5", ExtractSettings(**TINY, shard=Shard(k, 2)))
    shards = [tmp_path / "store.shard-0-of-2.h5", tmp_path / "store.shard-1-of-2.h5"]
    with h5py.File(shards[1], "r") as f:
        assert f["items/id"].shape == (15,) and f["features/text/tiny-bert/pooled"].shape == (15, 32)
        assert (f.attrs["shard_index"], f.attrs["shard_count"], f.attrs["shard_row_start"],
                f.attrs["shard_row_stop"], f.attrs["total_items"]) == (1, 2, 15, 30, 30)

    merged = merge_shards(shards, tmp_path / "store.h5")
    assert_same_store(merged, whole_path)
    with h5py.File(merged, "r") as f:
        assert all(f[f"features/{name}/{layer}"].is_virtual for name in SETS for layer in ("pooled", "status"))
        feature_bytes = sum(f[f"features/{name}/pooled"].nbytes for name in SETS)  # (30, 512) + (30, 32) float32
    # no copying: the merged file is the whole store less its feature matrices (plus a little mapping metadata)
    assert merged.stat().st_size < whole_path.stat().st_size - feature_bytes + 4096

    # the folder moves as a whole; a shard left behind is an error, not silently NaN rows
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in [merged, *shards]:
        shutil.move(path, moved / path.name)
    assert_same_store(moved / "store.h5", whole_path)
    result = CliRunner().invoke(embed, ["inspect", str(moved / "store.h5")])
    assert result.exit_code == 0 and "status      complete" in result.output, result.output

    # a further feature set goes into the merged file itself, beside the virtual ones
    provenance = {"pooled": {"backbone": "other", "weights_id": "w", "preprocessing": {}}}
    with FeatureSetWriter(moved / "store.h5", modality="text", source="other", layers={"pooled": 3},
                          provenance=provenance, add=True) as writer:
        writer.write(np.arange(30), {"pooled": np.ones((30, 3))}, np.full(30, STATUS_OK))
        assert writer.finish()
    with FeatureStore(moved / "store.h5") as store:
        assert store.load(["text/other/pooled", "text/tiny-bert/pooled"]).features["text/other/pooled"].shape == (30, 3)

    (moved / shards[1].name).unlink()
    with pytest.raises(FileNotFoundError, match="store.shard-1-of-2.h5"):
        FeatureStore(moved / "store.h5")


@pytest.mark.slow
def test_torchrun_two_processes_then_merge(whole, tmp_path):
    manifest_path, whole_path = whole
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "cli.embed", "extract", str(manifest_path), "--store", str(tmp_path / "store.h5"),
               "--shard", "auto", "--image-backbone", "tiny-resnet", "--text-backbone", "tiny-bert",
               "--image-size", "64", "--batch-size", "4", "--workers", "0", "--no-progress"]
    run = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

    result = CliRunner().invoke(embed, ["merge", str(tmp_path / "store.shard-0-of-2.h5"),
                                        str(tmp_path / "store.shard-1-of-2.h5"), "--out", str(tmp_path / "store.h5")])
    assert result.exit_code == 0, result.output
    assert "30 items" in result.output
    assert_same_store(tmp_path / "store.h5", whole_path)


# ----------------------------------------------------------------------------------------------- refusals

N = 10


def fake_shard(folder: Path, k: int, n: int, *, manifest="m1", finish=True) -> Path:
    """A shard written through the store API, without backbones: what merge sees of a real one."""
    shard = Shard(k, n)
    rows = shard.rows(N)
    path = shard.path_for(folder / "s.h5")
    create_store(path, ids=[f"i{r}" for r in rows], labels=[r % 2 for r in rows], splits=["train"] * len(rows),
                 classes=["a", "b"], manifest_sha256=manifest, shard=shard.attrs(N))
    provenance = {"pooled": {"backbone": "tiny", "weights_id": "w", "preprocessing": {}}}
    with FeatureSetWriter(path, modality="image", source="tiny", layers={"pooled": 2}, provenance=provenance) as w:
        done = len(rows) if finish else 1
        w.write(np.arange(done), {"pooled": np.full((done, 2), float(k))}, np.full(done, STATUS_OK))
        w.finish()
    return path


def test_fake_shards_merge(tmp_path):
    merged = merge_shards([fake_shard(tmp_path, k, 3) for k in (2, 0, 1)], tmp_path / "m.h5")  # any order
    with FeatureStore(merged) as store:
        data = store.load(["image/tiny/pooled"])
        assert data.ids.tolist() == [f"i{r}" for r in range(N)]
        assert data.features["image/tiny/pooled"][:, 0].tolist() == [0] * 4 + [1] * 3 + [2] * 3
    merge_shards([tmp_path / "s.shard-0-of-3.h5", tmp_path / "s.shard-1-of-3.h5", tmp_path / "s.shard-2-of-3.h5"],
                 merged)  # replacing an earlier merge is fine


@pytest.mark.parametrize("case, message", [
    ("gap", "rows 5..9 of 10 are in no shard given (missing: shard 1 of 2)"),
    ("manifest", "belongs to another manifest"),
    ("incomplete", "image/tiny/pooled in shard s.shard-1-of-2.h5 (shard 1 of 2 (rows 5..9 of 10)) is incomplete"),
    ("overlap", "overlap"),
    ("whole store", "is not a shard"),
])
def test_merge_refusals_name_the_problem_and_the_shard(tmp_path, case, message):
    first = fake_shard(tmp_path, 0, 2)
    if case == "gap":
        paths = [first]
    elif case == "manifest":
        paths = [first, fake_shard(tmp_path / "other", 1, 2, manifest="m2")]
    elif case == "incomplete":
        paths = [first, fake_shard(tmp_path, 1, 2, finish=False)]
    elif case == "overlap":
        paths = [first, fake_shard(tmp_path, 1, 2), fake_shard(tmp_path, 1, 3)]
    else:
        create_store(tmp_path / "whole.h5", ids=["x"], labels=[0], splits=["train"], classes=["a"],
                     manifest_sha256="m1")
        paths = [first, tmp_path / "whole.h5"]
    result = CliRunner().invoke(embed, ["merge", *map(str, paths), "--out", str(tmp_path / "m.h5")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "m.h5").exists()


def test_a_shard_file_resumes_only_as_the_same_shard(tmp_path):
    path = fake_shard(tmp_path, 0, 2)
    with pytest.raises(ValueError, match=r"holds shard 0 of 2 \(rows 0..4 of 10\), not every manifest item"):
        create_store(path, ids=["x"], labels=[0], splits=["train"], classes=["a"], manifest_sha256="m1")


# ----------------------------------------------------------------------------------------------- --shard


def test_shard_rows_are_contiguous_and_even():
    for n_items, count in [(10, 3), (30, 2), (7, 7), (100, 8)]:
        ranges = [Shard(k, count).rows(n_items) for k in range(count)]
        assert [r for part in ranges for r in part] == list(range(n_items))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    assert Shard(0, 2).path_for("runs/store.h5") == Path("runs/store.shard-0-of-2.h5")
    assert Shard(0, 2).path_for("runs/store.shard-0-of-2.h5") == Path("runs/store.shard-0-of-2.h5")


def test_parse_shard_and_the_torchrun_environment():
    assert parse_shard("1/4", {}) == Shard(1, 4)
    assert parse_shard(None, {}) is None
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert parse_shard(None, {"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: a whole store
    assert parse_shard("auto", {"RANK": "0", "WORLD_SIZE": "1"}) == Shard(0, 1)
    assert parse_shard("none", {"RANK": "1", "WORLD_SIZE": "2"}) is None


@pytest.mark.parametrize("value, message", [
    ("2/2", "k is 0-based and must be below n"),
    ("1/0", "must be below n"),
    ("x", "is not k/n, auto or none"),
    ("-1/2", "is not k/n, auto or none"),
    ("auto", "RANK and WORLD_SIZE"),
])
def test_bad_shard_is_a_one_line_error(tmp_path, value, message):
    runner = CliRunner(env={"RANK": None, "WORLD_SIZE": None})
    result = runner.invoke(embed, ["extract", str(tmp_path / "none.json"), "--store", str(tmp_path / "s.h5"),
                                   "--shard", value])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
