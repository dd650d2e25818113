"""The feature store's layout, provenance checks and reader, with plain h5py where a stranger would use it."""
import h5py
import numpy as np
import pytest

from embedstore.store import STATUS_MISSING_IMAGE, STATUS_OK, STATUS_PENDING, FeatureStore
from embedstore.store_writer import FeatureSetWriter, create_store
from store_factory import make_feature_store

N = 12
IDS = [f"item{i}" for i in range(N)]
LABELS = [i % 3 for i in range(N)]
SPLITS = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
CLASSES = ["Shoes", "Tshirts", "Watches"]


def make_store(path, manifest="m1"):
    create_store(path, ids=IDS, labels=LABELS, splits=SPLITS, classes=CLASSES, manifest_sha256=manifest,
                 catalog_spec={"format": "fashion", "path": "/x"})
    return path


def provenance(weights="w1"):
    return {"pooled": {"backbone": "tiny", "weights_id": weights, "preprocessing": {"size": 64}, "parameters": 7}}


def test_store_is_readable_with_plain_h5py(tmp_path):
    path = make_store(tmp_path / "s.h5")
    values = np.arange(N * 4, dtype=np.float32).reshape(N, 4)
    with FeatureSetWriter(path, modality="image", source="tiny", layers={"pooled": 4}, provenance=provenance()) as w:
        w.write(np.arange(N), {"pooled": values}, np.full(N, STATUS_OK))
        assert w.finish()
    with h5py.File(path, "r") as f:
        assert f["items/id"].asstr()[:].tolist() == IDS
        assert f["items/label"][:].tolist() == LABELS
        assert f["items/split"].asstr()[:].tolist() == SPLITS
        assert f["classes"].asstr()[:].tolist() == CLASSES
        dataset = f["features/image/tiny/pooled"]
        np.testing.assert_array_equal(dataset[:], values)
        assert dataset.attrs["backbone"] == "tiny" and dataset.attrs["weights_id"] == "w1"
        assert dataset.attrs["manifest_sha256"] == "m1" and dataset.attrs["complete"]
        assert f.attrs["format"] == "embedstore-feature-store"


def test_refuses_a_store_of_another_manifest(tmp_path):
    path = make_store(tmp_path / "s.h5")
    with pytest.raises(ValueError, match="another manifest"):
        make_store(path, manifest="m2")


def test_refuses_other_backbones_unless_added_and_never_mixes_weights(tmp_path):
    path = make_store(tmp_path / "s.h5")
    FeatureSetWriter(path, modality="image", source="tiny", layers={"pooled": 4}, provenance=provenance()).close()
    with pytest.raises(ValueError, match="--add"):
        FeatureSetWriter(path, modality="image", source="other", layers={"pooled": 4}, provenance=provenance())
    FeatureSetWriter(path, modality="image", source="other", layers={"pooled": 4}, provenance=provenance(),
                     add=True).close()
    with pytest.raises(ValueError, match="another weights_id"):
        FeatureSetWriter(path, modality="image", source="tiny", layers={"pooled": 4}, provenance=provenance("w2"))


def test_partial_set_is_incomplete_and_refused_by_readers(tmp_path):
    path = make_store(tmp_path / "s.h5")
    with FeatureSetWriter(path, modality="image", source="tiny", layers={"pooled": 4}, provenance=provenance()) as w:
        w.write(np.arange(5), {"pooled": np.ones((5, 4))}, np.full(5, STATUS_OK))
        assert not w.finish()
        assert w.pending_rows().tolist() == list(range(5, N))
    with FeatureStore(path) as store:
        assert not store.complete
        assert store.feature_sets["image/tiny/pooled"].counts["pending"] == N - 5
        with pytest.raises(ValueError, match="incomplete"):
            store.load(["image/tiny/pooled"])
    # resuming picks up exactly the pending rows
    with FeatureSetWriter(path, modality="image", source="tiny", layers={"pooled": 4}, provenance=provenance()) as w:
        assert w.pending_rows().tolist() == list(range(5, N))


def test_load_aligns_rows_skipped_by_any_set(tmp_path):
    written = make_feature_store(tmp_path / "s.h5", classes=CLASSES, per_split=(6, 3, 3),   # IDS, LABELS, SPLITS
                                 features={"image/a/pooled": 4, "text/b/pooled": 3},
                                 nan_rows={"image/a/pooled": [2]})   # row 2 written as skipped
    path, text = written.path, written.features["text/b/pooled"]
    with FeatureStore(path) as store:
        data = store.load(["image/a/pooled", "text/b/pooled"])
        assert data.skipped == 1 and "item2" not in data.ids
        np.testing.assert_array_equal(data.features["text/b/pooled"], np.delete(text, 2, axis=0))
        assert data.labels.tolist() == np.delete(np.array(LABELS), 2).tolist()
        assert store.find("text", "pooled") == "text/b/pooled"
        with pytest.raises(ValueError, match="no image 'dense' features"):
            store.find("image", "dense")


def test_skipped_rows_are_nan_and_counted(tmp_path):
    path = make_store(tmp_path / "s.h5")
    status = np.full(N, STATUS_OK, dtype=np.int8)
    status[[1, 4]] = STATUS_MISSING_IMAGE
    with FeatureSetWriter(path, modality="image", source="tiny", layers={"pooled": 2}, provenance=provenance()) as w:
        w.write(np.arange(N), {"pooled": np.zeros((N - 2, 2))}, status)
        assert w.finish()
    with FeatureStore(path) as store:
        info = store.feature_sets["image/tiny/pooled"]
        assert info.counts["skipped: missing image"] == 2 and info.counts["ok"] == N - 2
        assert info.counts["pending"] == 0
    with h5py.File(path, "r") as f:
        assert np.isnan(f["features/image/tiny/pooled"][1]).all()
        assert (f["features/image/tiny/status"][:] != STATUS_PENDING).all()


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="embed extract"):
        FeatureStore(tmp_path / "absent.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        FeatureStore(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="not an embedstore feature store"):
        FeatureStore(tmp_path / "other.h5")


def test_a_view_reads_its_feature_sets_once_and_refresh_reads_them_again(tmp_path, monkeypatch):
    """feature_sets was asked for hundreds of times per sweep, each time re-reading every set's HDF5 attributes;
    a view now reads them once, hands out copies, and `refresh()` reads the file again."""
    path = make_store(tmp_path / "s.h5")
    with FeatureSetWriter(path, modality="image", source="tiny", layers={"pooled": 4}, provenance=provenance()) as w:
        w.write(np.arange(N), {"pooled": np.ones((N, 4), np.float32)}, np.full(N, STATUS_OK))
        assert w.finish()
    reads = []
    real_read = FeatureStore._read_feature_sets
    monkeypatch.setattr(FeatureStore, "_read_feature_sets", lambda self: reads.append(1) or real_read(self))
    with FeatureStore(path) as store:
        first = store.feature_sets
        first.pop("image/tiny/pooled")   # a caller's edit of its copy
        assert list(store.feature_sets) == ["image/tiny/pooled"] and store.complete
        store.ok_rows(["image/tiny/pooled"])
        assert len(reads) == 1
        store.refresh()
        assert store.feature_sets["image/tiny/pooled"].complete and len(reads) == 2
