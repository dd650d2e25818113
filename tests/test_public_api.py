"""The library side: embedstore.open_store / list_feature_sets / store.arrays and heads.inputs_for."""
import numpy as np
import pytest

import embedstore
import heads
from heads.sweep import resolve_feature_sets
from store_factory import make_feature_store

C, N = 3, 60


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """Two image backbones, one text backbone and modules; row 5 has no text features (skipped)."""
    return make_feature_store(tmp_path_factory.mktemp("api") / "store.h5", classes=["bag", "shirt", "watch"],
                              per_split=(30, 15, 15), separation=0.0, nan_rows={"text/minilm/pooled": [5]},
                              features={"image/backbone-a/pooled": np.arange(N * 6).reshape(N, 6),
                                        "image/backbone-b/pooled": 5, "text/minilm/pooled": 4,
                                        "image/module-i/dense": 8, "text/module-t/dense": 8}).path


def test_open_and_list(store_path, tmp_path):
    with embedstore.open_store(store_path) as store:
        assert embedstore.list_feature_sets(store) == sorted(store.feature_sets)
    assert "text/minilm/pooled" in embedstore.list_feature_sets(store_path)
    with pytest.raises(FileNotFoundError, match="no feature store at"):
        embedstore.open_store(tmp_path / "absent.h5")


def test_arrays_gives_aligned_inputs_and_class_names(store_path):
    with embedstore.open_store(store_path) as store:
        (image, text), y = store.arrays("train", ["image/backbone-a/pooled", "text/minilm/pooled"])
        assert image.shape == (29, 6) and text.shape == (29, 4)  # row 5 lacks text: left out of both
        assert image[:, 0].tolist() == [6 * k for k in range(30) if k != 5]  # rows stay aligned, in order
        assert y.tolist() == [["bag", "shirt", "watch"][k % C] for k in range(30) if k != 5]
        (alone,), _ = store.arrays("test", "image/backbone-a/pooled")
        assert alone.shape == (15, 6)
        with pytest.raises(ValueError, match="unknown split 'dev'"):
            store.arrays("dev", ["text/minilm/pooled"])


def test_inputs_for_picks_the_only_source_and_asks_when_there_are_several(store_path):
    with embedstore.open_store(store_path) as store:
        with pytest.raises(ValueError, match=r"several sources \(backbone-a, backbone-b\); choose one with "
                                             r"image_source=") as error:
            heads.inputs_for(store, "2A")
        assert "\n" not in str(error.value)
        assert heads.inputs_for(store, "2A", image_source="backbone-b") == ["image/backbone-b/pooled",
                                                                              "text/minilm/pooled"]
        assert heads.inputs_for(store, "1A") == ["image/module-i/dense", "text/module-t/dense"]
        assert heads.inputs_for(store, "text") == ["text/minilm/pooled"]
        with pytest.raises(ValueError, match="no image 'pooled' features from source 'resnet50'; its image "
                                             "'pooled' sources: backbone-a, backbone-b"):
            heads.inputs_for(store, "image", image_source="resnet50")
        with pytest.raises(ValueError, match="1B needs image 'classifier' and text 'classifier' features"):
            heads.inputs_for(store, "1B")
        with pytest.raises(ValueError, match="unknown strategy '3A'"):
            heads.inputs_for(store, "3A")


def test_the_sweep_adds_the_other_modality_to_a_baseline_for_shared_rows(store_path):
    with embedstore.open_store(store_path) as store:
        assert resolve_feature_sets(store, "text", image_source="backbone-a") == ["image/backbone-a/pooled",
                                                                                  "text/minilm/pooled"]
        assert resolve_feature_sets(store, "text") == ["text/minilm/pooled"]  # ambiguous image: own rows
        assert resolve_feature_sets(store, "2A", image_source="backbone-a") == \
            heads.inputs_for(store, "2A", image_source="backbone-a")
