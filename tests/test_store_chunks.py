"""Row-chunked feature datasets, float16 stores (`embed extract --dtype float16`), and reading stores written
before chunking."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import embedstore.chunks as chunks
from cli.embed import embed
from embedstore.catalog import open_catalog
from embedstore.inspect import describe_store
from embedstore.chunks import block_rows, chunk_rows_for, read_rows
from embedstore.manifest import SplitSettings, prepare_manifest
from embedstore.store import FeatureStore
from embedstore.store_writer import FeatureSetWriter
from store_factory import make_feature_store
from tests.catalog_factory import make_fashion_catalog

N, CLASSES = 300, ["a", "b", "c"]


def _store(path, *, dtype="float32", image=None):
    """Pure noise (no class signal): 40-d image, 12-d text; `image` replaces the image matrix."""
    data = make_feature_store(path, classes=CLASSES, splits=["train", "val", "test"] * (N // 3), separation=0.0,
                              features={"image/x/pooled": 40 if image is None else image, "text/y/pooled": 12},
                              dtype=dtype)
    return data.features["image/x/pooled"], data.features["text/y/pooled"]


@pytest.mark.parametrize("dim, itemsize", [(1280, 4), (1280, 2), (384, 4), (500, 4), (37, 2), (300_000, 4)])
def test_chunk_rows_are_a_power_of_two_of_at_most_1_mib(dim, itemsize):
    rows = chunk_rows_for(dim, itemsize)
    assert rows & (rows - 1) == 0
    assert rows == 1 or 2**19 < rows * dim * itemsize <= 2**20   # 0.5-1 MiB unless one row is bigger
    assert chunk_rows_for(dim, itemsize, n_rows=3) == min(rows, 3)


def test_new_feature_sets_are_row_chunked_and_allocated_in_full(tmp_path, monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1024)   # 40 float32 -> 160 B per row -> 4 rows per chunk
    _store(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        image = f["features/image/x/pooled"]
        assert image.chunks == (4, 40) and image.attrs["chunk_rows"] == 4
        assert f["features/text/y/pooled"].chunks == (16, 12)   # 48 B per row -> 16 rows: aligned with 4
        assert image.compression is None
        # early allocation: every chunk exists at creation (the crash-safety contract: writes touch raw data only)
        assert image.id.get_storage_size() == N * 40 * 4


def test_float16_round_trip_and_upcast(tmp_path):
    image, text = _store(tmp_path / "s.h5", dtype="float16")
    with FeatureStore(tmp_path / "s.h5") as store:
        info = store.feature_sets["image/x/pooled"]
        assert info.dtype == "float16" and info.provenance["dtype"] == "float16"
        data = store.load(["image/x/pooled", "text/y/pooled"])
        assert data.features["image/x/pooled"].dtype == np.float32                    # upcast for readers
        np.testing.assert_array_equal(data.features["image/x/pooled"], image.astype(np.float16).astype(np.float32))
        kept = store.load(["image/x/pooled"], upcast=False).features["image/x/pooled"]
        assert kept.dtype == np.float16 and kept.nbytes == image.nbytes // 2          # half the memory
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["features/image/x/pooled"].id.get_storage_size() == N * 40 * 2      # half the disk


def test_float16_refuses_values_it_cannot_hold(tmp_path):
    image = np.ones((N, 40), dtype=np.float32)
    image[5, 3] = 1e6   # beyond float16's 65504: would silently become inf
    with pytest.raises(ValueError, match="beyond float16's range .*--dtype float32"):
        _store(tmp_path / "s.h5", dtype="float16", image=image)


def test_resuming_with_another_dtype_is_refused(tmp_path):
    _store(tmp_path / "s.h5", dtype="float16")
    provenance = {"pooled": {"backbone": "x", "weights_id": "synthetic", "preprocessing": {}}}
    with pytest.raises(ValueError, match="another dtype"):
        FeatureSetWriter(tmp_path / "s.h5", modality="image", source="x", layers={"pooled": 40},
                         provenance=provenance, dtype="float32")
    with pytest.raises(ValueError, match="unknown feature dtype 'int8'"):
        FeatureSetWriter(tmp_path / "s.h5", modality="image", source="x", layers={"pooled": 40},
                         provenance=provenance, dtype="int8")


def test_store_written_before_chunking_reads_the_same(tmp_path):
    image, _ = _store(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r+") as f:   # rewrite one set as the old, contiguous layout
        old = f["features/image/x/pooled"]
        values, attrs = old[:], dict(old.attrs)
        del f["features/image/x/pooled"]
        new = f["features/image/x"].create_dataset("pooled", data=values)
        new.attrs.update({k: v for k, v in attrs.items() if k != "chunk_rows"})
        assert new.chunks is None
        assert block_rows(new) == chunk_rows_for(40, 4)
    with FeatureStore(tmp_path / "s.h5") as store:
        np.testing.assert_array_equal(store.load(["image/x/pooled"]).features["image/x/pooled"], image)
    lines = describe_store(tmp_path / "s.h5")
    layouts = {line.split(":")[0].removeprefix("feature set "): lines[i + 1] for i, line in enumerate(lines)
               if line.startswith("feature set ")}
    assert "contiguous (written before row chunking" in layouts["image/x/pooled"]
    assert f"chunks of {chunk_rows_for(12, 4, N)} rows" in layouts["text/y/pooled"]


@pytest.mark.parametrize("contiguous", [False, True])
def test_read_rows_equals_fancy_indexing_across_blocks(tmp_path, monkeypatch, contiguous):
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 256)   # 8 rows per block of (N, 8) float32
    values = np.random.default_rng(1).normal(size=(N, 8)).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dataset = f.create_dataset("x", data=values, chunks=None if contiguous else (8, 8))
        rows = np.sort(np.random.default_rng(2).choice(N, 77, replace=False))
        np.testing.assert_array_equal(read_rows(dataset, rows, np.float32), values[rows])
        assert read_rows(dataset, np.array([], dtype=np.int64), None).shape == (0, 8)


def test_cli_extract_float16(tmp_path):
    info = make_fashion_catalog(tmp_path / "catalog", per_class=6, as_zip=True, image_px=(32, 32))
    manifest = prepare_manifest(open_catalog(info.path), SplitSettings(min_items=5, items_per_class=5, train=3,
                                                                       val=1, test=1))
    manifest.save(tmp_path / "m.json")
    args = ["extract", str(tmp_path / "m.json"), "--image-backbone", "none", "--text-backbone", "tiny-bert",
            "--no-progress", "--dtype", "float16"]
    result = CliRunner().invoke(embed, args + ["--store", str(tmp_path / "h.h5")])
    assert result.exit_code == 0, result.output
    CliRunner().invoke(embed, args[:-1] + ["float32", "--store", str(tmp_path / "f.h5")])
    with FeatureStore(tmp_path / "h.h5") as half, FeatureStore(tmp_path / "f.h5") as full:
        name = half.find("text", "pooled")
        assert half.feature_sets[name].dtype == "float16" and full.feature_sets[name].dtype == "float32"
        a, b = half.load([name]).features[name], full.load([name]).features[name]
        assert a.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_array_equal(a, b.astype(np.float16).astype(np.float32))   # same features, rounded
    result = CliRunner().invoke(embed, args[:-1] + ["float64", "--store", str(tmp_path / "x.h5")])
    assert result.exit_code == 2 and "float64" in result.output
