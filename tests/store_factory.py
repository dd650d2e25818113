"""Synthetic feature stores for tests: class-separable Gaussian features written with the store writer.

Every feature set named in `features` is drawn, in that order, from one generator (`seed`):

    x = means[label] * separation + N(0, 1) * noise      means = N(0, 1) of shape (classes, dim)

(with `separation` 0, no means are drawn: pure noise). So the same arguments give the same store, and a test
whose numbers depend on the draw keeps them. Import it as `from store_factory import ...` (like
catalog_factory.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from embedstore.store_writer import write_store_from_arrays

SPLITS = ("train", "val", "test")
IMAGE, TEXT = "image/tiny-img/pooled", "text/tiny-txt/pooled"
SEPARATION = 2.0   # class means * 2 against unit noise: a linear head is far above chance in a few epochs


@dataclass(frozen=True)
class SyntheticStore:
    """What was generated, row for row as written: item ids "item<i>", label indices, split names, class names,
    {feature set name: (N, D) float32 matrix} (NaN rows included: the store marks them skipped), and the store's
    path (None from make_features)."""
    ids: list[str]
    labels: np.ndarray
    splits: np.ndarray
    classes: list[str]
    features: dict[str, np.ndarray]
    path: Path | None = None


def make_features(*, classes: int | Sequence[str] = 4, per_split: Sequence[int] = (120, 60, 60),
                  per_class: Sequence[int] | None = None, splits: Sequence[str] | None = None,
                  features: Mapping[str, int | np.ndarray] | None = None,
                  separation: float | Mapping[str, float] = SEPARATION, noise: float = 1.0,
                  signal_free: Mapping[str, Sequence[str]] | None = None,
                  nan_rows: Mapping[str, Sequence[int]] | None = None, row_order: Sequence[int] | None = None,
                  seed: int | np.random.Generator = 0) -> SyntheticStore:
    """The rows and features of a synthetic store, without writing it.

    classes: how many ("class0", ...) or their names. Rows, one of:
      per_split (train, val, test): that many rows of each split, in that order; row i has label i % classes;
      per_class (train, val, test): class by class (a manifest's order), each class's rows of each split;
      splits: the split of every row, given; row i has label i % classes.
    features: {"<modality>/<source>/<layer>": dim, drawn as above, or a matrix (N, D), written as given};
      default IMAGE (24-d) and TEXT (16-d).
    separation: one value, or {set name: value} (sets not named get SEPARATION); 0: no class signal.
    signal_free: {set name: splits} whose rows are drawn again, after the set, as N(0, 1) * separation: the
      class signal is gone there (a head trusting that set fails on those splits).
    nan_rows: {set name: row indices} made NaN (a skipped row in the store), after every draw.
    row_order: the rows written, in this order (a permutation: the same items in another order).
    seed: an int, or a Generator, which goes on from where the draws leave it (np.random.default_rng(seed)).
    """
    names = [f"class{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    if per_class is not None and splits is not None:
        raise ValueError("give per_class or splits, not both (either replaces per_split)")
    if per_class is not None:
        labels = np.repeat(np.arange(len(names)), sum(per_class))
        split = np.tile(np.repeat(SPLITS, per_class), len(names))
    else:
        split = np.asarray(splits) if splits is not None else np.repeat(SPLITS, per_split)
        labels = np.arange(len(split)) % len(names)
    n = len(labels)
    rng = np.random.default_rng(seed)
    features = {IMAGE: 24, TEXT: 16} if features is None else features
    matrices = {}
    for name, spec in features.items():
        if not isinstance(spec, (int, np.integer)):
            matrices[name] = np.array(spec, dtype=np.float32)
            if matrices[name].shape[0] != n:
                raise ValueError(f"{name}: {matrices[name].shape[0]} rows given, the store has {n}")
            continue
        sep = separation.get(name, SEPARATION) if isinstance(separation, Mapping) else separation
        if sep:   # the class means first, then the noise: the order the tests' numbers were drawn in
            x = rng.normal(size=(len(names), spec))[labels] * sep + rng.normal(size=(n, spec)) * noise
        else:
            x = rng.normal(size=(n, spec)) * noise
        for s in (signal_free or {}).get(name, ()):
            rows = split == s
            x[rows] = rng.normal(size=(rows.sum(), spec)) * sep
        matrices[name] = x.astype(np.float32)
    for name, rows in (nan_rows or {}).items():
        matrices[name][np.asarray(rows, dtype=int)] = np.nan
    ids = np.array([f"item{i}" for i in range(n)])
    if row_order is not None:
        order = np.asarray(row_order)
        ids, labels, split = ids[order], labels[order], split[order]
        matrices = {name: m[order] for name, m in matrices.items()}
    return SyntheticStore(ids.tolist(), labels, split, names, matrices)


def make_feature_store(path: str | Path, *, provenance: Mapping[str, Mapping] | None = None,
                       manifest_sha256: str = "test-manifest", dtype: str = "float32", **rows_and_features
                       ) -> SyntheticStore:
    """make_features(**rows_and_features) written as a complete store at `path` (folders made) with
    write_store_from_arrays: provenance {set name: extra provenance (e.g. {"parameters": 10})}, the manifest
    sha256 the store records, the stored dtype. Returns what was written, with .path."""
    data = make_features(**rows_and_features)
    provenance = provenance or {}
    written = write_store_from_arrays(path, ids=data.ids, labels=data.labels, splits=data.splits,
                                      classes=data.classes, manifest_sha256=manifest_sha256, dtype=dtype,
                                      features={name: (m, provenance.get(name, {}))
                                                for name, m in data.features.items()})
    return SyntheticStore(data.ids, data.labels, data.splits, data.classes, data.features, written)
