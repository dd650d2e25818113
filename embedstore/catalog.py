"""Catalogs: where item ids, labels, titles and images come from. This module opens one, by path or by the spec
recorded in a manifest or a store.

Two formats:
- "fashion" (embedstore/catalog_fashion.py): the Kaggle Fashion Product Images layout (`styles.csv` +
  `images/<id>.jpg`), as a folder or straight from the downloaded zip (never unpacked).
- "csv" (embedstore/catalog_csv.py): any CSV file whose id, image, title and label columns are named by
  `CsvColumns`; image paths are relative to the CSV's folder, or absolute.

Both implement embedstore/catalog_base.py's Catalog; a catalog is picklable and opens its zip lazily in each
process (embedstore/catalog_files.py), because DataLoader worker processes read images through it.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import asdict

from embedstore.catalog_base import Catalog
from embedstore.catalog_csv import CsvCatalog, CsvColumns
from embedstore.catalog_fashion import FashionCatalog, is_fashion_header

FORMATS = ("auto", "fashion", "csv")


def _csv_header(csv_path: str) -> list[str]:
    with open(csv_path, "rb") as handle:
        return [name.strip() for name in handle.readline().decode("utf-8", "replace").lstrip("\ufeff").split(",")]


def open_catalog(path: str | os.PathLike, fmt: str = "auto", columns: CsvColumns | None = None) -> Catalog:
    """Open a catalog. fmt="auto": a zip, or a folder holding styles.csv -> fashion; a .csv file -> generic CSV,
    unless it lacks the named columns and is a Fashion styles.csv (then fashion, rooted at its folder).
    `columns` (default CsvColumns()) names a generic CSV's columns; the fashion format ignores it."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown catalog format {fmt!r}; use one of {', '.join(FORMATS)}")
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"catalog not found: {path}")
    columns = columns or CsvColumns()
    if fmt == "auto":
        fmt = _detect_format(path, columns)
    if fmt == "csv":
        return CsvCatalog(path, columns)
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        return FashionCatalog(os.path.dirname(path), root="")
    return FashionCatalog(path)


def _detect_format(path: str, columns: CsvColumns) -> str:
    if os.path.isdir(path):
        return "fashion"
    if path.lower().endswith(".csv"):
        header = _csv_header(path)
        if not set(asdict(columns).values()) <= set(header) and is_fashion_header(header):
            return "fashion"
        return "csv"
    if zipfile.is_zipfile(path):
        return "fashion"
    raise ValueError(f"cannot tell the catalog format of {path}; give a Fashion Product Images folder or zip, or a "
                     f".csv file (with fmt='csv' and its columns)")


def open_catalog_from_spec(spec: dict) -> Catalog:
    """Re-open a catalog from `catalog.spec()` (as recorded in a manifest or a feature store)."""
    if not isinstance(spec, dict) or spec.get("format") not in ("fashion", "csv") or "path" not in spec:
        raise ValueError(f"not a catalog spec: {spec!r}; expected a dict with 'format' (fashion or csv) and 'path'")
    if spec["format"] == "csv":
        try:
            columns = CsvColumns(**spec.get("columns", {}))
        except TypeError as error:
            raise ValueError(f"bad columns in catalog spec {spec!r}: {error}") from None
        return CsvCatalog(spec["path"], columns)
    return FashionCatalog(spec["path"], root=spec.get("root"))
