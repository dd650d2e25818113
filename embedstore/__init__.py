"""embedstore: an HDF5 feature store of image/text backbone features (see docs/ARCHITECTURE.md).

The library side, for notebooks:

    import embedstore
    store = embedstore.open_store("store.h5")        # a read-only FeatureStore; also a context manager
    embedstore.list_feature_sets(store)               # ["image/efficientnet_lite0/pooled", ...]
    Xs, y = store.arrays("train", names)              # one (n, D) array per named set, y = class names
"""
from __future__ import annotations

import os

from embedstore.store import FeatureSetInfo, FeatureStore

__all__ = ["FeatureSetInfo", "FeatureStore", "list_feature_sets", "open_store"]


def open_store(path: str | os.PathLike) -> FeatureStore:
    """Open a feature store for reading (FileNotFoundError / one-line ValueError when it is none)."""
    return FeatureStore(path)


def list_feature_sets(store: FeatureStore | str | os.PathLike) -> list[str]:
    """The names of the store's feature sets ("<modality>/<source>/<layer>"), sorted."""
    if isinstance(store, FeatureStore):
        return sorted(store.feature_sets)
    with FeatureStore(store) as opened:
        return sorted(opened.feature_sets)
