"""The "fashion" catalog format: the Kaggle Fashion Product Images layout (`styles.csv` + `images/<id>.jpg`), as a
folder or straight from the downloaded zip (never unpacked). Label = articleType, title = productDisplayName.
"""
from __future__ import annotations

import csv
import os
import zipfile

from embedstore.catalog_base import (Catalog, CatalogItem, CatalogRows, csv_fields_up_to, keep_row,
                                     refuse_duplicated_columns, row_problem)
from embedstore.catalog_files import FolderFiles, ZipFiles

FASHION_STYLES = "styles.csv"
FASHION_ID, FASHION_LABEL, FASHION_TITLE = "id", "articleType", "productDisplayName"


class FashionCatalog(Catalog):
    """Fashion Product Images: `<root>/styles.csv` and `<root>/images/<id>.jpg`, in a folder or a zip.

    styles.csv is not valid CSV: some titles hold unquoted commas. The title is the last column, so each line
    is split on its first (number of columns - 1) commas, which keeps those rows whole.
    """

    format = "fashion"

    def __init__(self, path: str | os.PathLike, root: str | None = None):
        self.path = os.path.abspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"catalog not found: {self.path}")
        self.is_zip = os.path.isfile(self.path)
        if self.is_zip and not zipfile.is_zipfile(self.path):
            raise ValueError(f"{self.path} is neither a folder nor a zip file; give the Fashion Product Images "
                             f"folder or its zip")
        self.root = _find_fashion_root(self.path, self.is_zip) if root is None else root.strip("/")
        prefix = self.root + "/" if self.root else ""
        files = ZipFiles(self.path, prefix) if self.is_zip else FolderFiles(os.path.join(self.path, self.root))
        super().__init__(files)
        if not files.exists(FASHION_STYLES):
            raise FileNotFoundError(f"{FASHION_STYLES} not found in {self.path} under {self.root or '/'}")

    def spec(self) -> dict:
        return {"format": self.format, "path": self.path, "root": self.root}

    def read_rows(self) -> CatalogRows:
        data = self._files.read(FASHION_STYLES)
        lines = data.split(b"\n")
        header = [name.strip() for name in lines[0].decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r").split(",")]
        columns = _fashion_columns(header, self.path)
        rows, seen = CatalogRows(), {}
        with csv_fields_up_to(len(data)):
            for line_no, raw in enumerate(lines[1:], start=2):
                self._read_line(rows, seen, columns, len(header), line_no, raw)
        return rows

    def _read_line(self, rows: CatalogRows, seen: dict, columns, n_fields: int, line_no: int, raw: bytes) -> None:
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            return  # blank line (the file's final newline): not a row
        fields, reason = _split_fashion_line(raw, n_fields)
        item = None
        if reason is None:
            item = CatalogItem(id=fields[columns[0]], label=fields[columns[1]], title=fields[columns[2]],
                               image=f"images/{fields[columns[0]]}.jpg")
            reason = row_problem(item, seen, line_no)
        keep_row(rows, item if reason is None else None, line_no, reason)


def _split_fashion_line(raw: bytes, n_fields: int) -> tuple[list[str], str | None]:
    """(fields, None) or ([], reason). Split on the first n_fields - 1 commas so commas in the title survive;
    a line with quotes is first tried as proper CSV, for copies re-saved by a tool that quotes titles."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return [], f"not valid UTF-8 (byte {error.start})"
    fields = None
    if '"' in line:
        try:
            parsed = next(csv.reader([line]))
        except csv.Error:  # not proper CSV after all: split it like any other line
            parsed = []
        fields = parsed if len(parsed) == n_fields else None
    if fields is None:
        fields = line.split(",", n_fields - 1)
    if len(fields) < n_fields:
        return [], f"expected {n_fields} fields, found {len(fields)}"
    return [value.strip() for value in fields], None


def _fashion_columns(header: list[str], path: str) -> tuple[int, int, int]:
    """Indices of id, label and title; the title must be last, since it is the column that holds commas."""
    missing = [name for name in (FASHION_ID, FASHION_LABEL, FASHION_TITLE) if name not in header]
    if missing:
        raise ValueError(f"{FASHION_STYLES} in {path} lacks column(s) {', '.join(missing)}; columns present: "
                         f"{', '.join(header)}; is this a Fashion Product Images catalog?")
    refuse_duplicated_columns(header, (FASHION_ID, FASHION_LABEL, FASHION_TITLE), f"{FASHION_STYLES} in {path}")
    if header[-1] != FASHION_TITLE:
        raise ValueError(f"{FASHION_STYLES} in {path}: {FASHION_TITLE} must be the last column (found "
                         f"{header[-1]!r}), because titles may hold unquoted commas")
    return header.index(FASHION_ID), header.index(FASHION_LABEL), header.index(FASHION_TITLE)


def _find_fashion_root(path: str, is_zip: bool) -> str:
    """The directory holding styles.csv, relative to the folder or zip: the shallowest one, if unambiguous."""
    if is_zip:
        with zipfile.ZipFile(path) as archive:
            candidates = [name[: -len(FASHION_STYLES)].rstrip("/") for name in archive.namelist()
                          if name == FASHION_STYLES or name.endswith("/" + FASHION_STYLES)]
    else:
        candidates = [os.path.relpath(folder, path) for folder, _, files in _walk(path, max_depth=2)
                      if FASHION_STYLES in files]
        candidates = ["" if folder == "." else folder.replace(os.sep, "/") for folder in candidates]
    if not candidates:
        raise FileNotFoundError(f"no {FASHION_STYLES} found in {path}; give the Fashion Product Images folder or "
                                f"zip (the one holding styles.csv and images/)")
    depth = min(folder.count("/") + bool(folder) for folder in candidates)
    shallowest = sorted(f for f in candidates if f.count("/") + bool(f) == depth)
    if len(shallowest) > 1:
        raise ValueError(f"{path} holds several {FASHION_STYLES} files ({', '.join(shallowest)}); give the folder "
                         f"of the one you mean")
    return shallowest[0]


def _walk(top: str, max_depth: int):
    """os.walk that stops max_depth levels below top (a catalog's root is near the top; images/ is huge)."""
    for folder, dirs, files in os.walk(top):
        depth = os.path.relpath(folder, top).count(os.sep) + (folder != top)
        if depth >= max_depth or FASHION_STYLES in files:
            dirs[:] = []  # never descend into a found root's images/ folder
        yield folder, dirs, files


def is_fashion_header(header: list[str]) -> bool:
    """Whether a CSV header is a Fashion Product Images styles.csv's (it names the fashion columns)."""
    return all(name in header for name in (FASHION_ID, FASHION_LABEL, FASHION_TITLE))
