"""Catalogs: where item ids, labels, titles and images come from.

Two formats:
- "fashion": the Kaggle Fashion Product Images layout (`styles.csv` + `images/<id>.jpg`), as a folder or
  straight from the downloaded zip (never unpacked). Label = articleType, title = productDisplayName.
- "csv": any CSV file whose id, image, title and label columns are named by `CsvColumns`; image paths are
  relative to the CSV's folder, or absolute.

Every catalog answers the same four questions (`read_rows`, `has_image`, `read_image_bytes`, `spec`) so the
manifest and the extractor never care which format they read. A catalog is picklable and opens its zip lazily
in each process, because DataLoader worker processes read images through it.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

FASHION_STYLES = "styles.csv"
FASHION_ID, FASHION_LABEL, FASHION_TITLE = "id", "articleType", "productDisplayName"
FORMATS = ("auto", "fashion", "csv")


@dataclass(frozen=True)
class CatalogItem:
    """One row of a catalog, as the catalog states it (title uncleaned, image not checked)."""

    id: str     # the catalog's item id, as text
    label: str  # class name (articleType for Fashion Product Images)
    title: str  # raw product title (productDisplayName)
    image: str  # image reference relative to the catalog root, e.g. "images/15970.jpg" (or an absolute path)


@dataclass
class CatalogRows:
    """Everything a catalog's table holds: parsed items plus the rows that could not become items.

    Every data row of the file ends up in exactly one of the two lists, so nothing is lost without a trace.
    """

    items: list[CatalogItem] = field(default_factory=list)
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (1-based line number, reason)

    @property
    def n_rows(self) -> int:
        return len(self.items) + len(self.malformed)


@dataclass(frozen=True)
class CsvColumns:
    """Names of the columns a generic CSV catalog reads."""

    id: str = "id"
    image: str = "image"
    title: str = "title"
    label: str = "label"


# ----------------------------------------------------------------------------------------------- file access
class FolderFiles:
    """Files under a folder; refs are relative to it (an absolute ref is used as is)."""

    def __init__(self, folder: str):
        self.folder = folder

    def _path(self, ref: str) -> str:
        return os.path.join(self.folder, ref)

    def exists(self, ref: str) -> bool:
        return bool(ref) and os.path.isfile(self._path(ref))

    def read(self, ref: str) -> bytes:
        if not self.exists(ref):
            raise FileNotFoundError(f"image {ref!r} not found under {self.folder}")
        with open(self._path(ref), "rb") as handle:
            return handle.read()


class _ZipFiles:
    """Files under a folder inside a zip. The ZipFile handle and member set are per process and never pickled:
    a handle inherited through fork would share its file offset with the parent and corrupt concurrent reads."""

    def __init__(self, zip_path: str, prefix: str):
        self.zip_path = zip_path
        self.prefix = prefix  # "" or "folder/" inside the zip
        self._zip: zipfile.ZipFile | None = None
        self._members: frozenset[str] = frozenset()
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        return {"zip_path": self.zip_path, "prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["zip_path"], state["prefix"])

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)  # the parent's handle (if any) is left to the parent
            self._members = frozenset(self._zip.namelist())
            self._pid = os.getpid()
        return self._zip

    def exists(self, ref: str) -> bool:
        self._handle()
        return bool(ref) and self.prefix + ref in self._members

    def read(self, ref: str) -> bytes:
        if not self.exists(ref):
            raise FileNotFoundError(f"image {ref!r} not found in {self.zip_path} (under {self.prefix or '/'})")
        return self._zip.read(self.prefix + ref)

    def close(self) -> None:
        if self._zip is not None and self._pid == os.getpid():
            self._zip.close()
        self._zip, self._pid = None, None


# -------------------------------------------------------------------------------------------------- catalogs
class Catalog:
    """The interface every catalog format implements."""

    format: str = ""
    path: str = ""  # absolute path of what the user opened (folder, zip or CSV file)

    def __init__(self, files):
        self._files = files

    def read_rows(self) -> CatalogRows:
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able description that `open_catalog_from_spec` re-opens (recorded in manifests and stores)."""
        raise NotImplementedError

    def has_image(self, ref: str) -> bool:
        """Whether the image exists, without reading it (cheap enough to ask for every row)."""
        return self._files.exists(ref)

    def read_image_bytes(self, ref: str) -> bytes:
        """The image file's bytes; FileNotFoundError if it is absent. Decoding is the caller's job."""
        return self._files.read(ref)

    def close(self) -> None:
        close = getattr(self._files, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


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
        files = _ZipFiles(self.path, prefix) if self.is_zip else FolderFiles(os.path.join(self.path, self.root))
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
            reason = _row_problem(item, seen, line_no)
        _keep(rows, item if reason is None else None, line_no, reason)


class CsvCatalog(Catalog):
    """A generic CSV catalog: one row per item, with id, image, title and label columns named by `CsvColumns`."""

    format = "csv"

    def __init__(self, path: str | os.PathLike, columns: CsvColumns | None = None):
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"catalog CSV not found: {self.path}")
        self.columns = columns or CsvColumns()
        super().__init__(FolderFiles(os.path.dirname(self.path)))
        self._check_columns(next(csv.reader([self._text(header_only=True)]), []))

    def spec(self) -> dict:
        return {"format": self.format, "path": self.path, "columns": asdict(self.columns)}

    def _text(self, header_only: bool = False) -> str:
        """The file's text (or its first line); a one-line ValueError when it is not UTF-8."""
        try:
            with open(self.path, encoding="utf-8-sig", newline="") as handle:
                return handle.readline() if header_only else handle.read()
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path} is not UTF-8 text (byte {error.start}); re-save it as UTF-8") from None

    def _check_columns(self, header: list[str]) -> None:
        for role, name in asdict(self.columns).items():
            if name not in header:
                raise ValueError(f"column {name!r} (the {role} column) not in {self.path}; columns present: "
                                 f"{', '.join(header) or '(none)'}; name the right one with --{role}-column "
                                 f"(CsvColumns({role}=...) from Python)")
        refuse_duplicated_columns(header, asdict(self.columns).values(), self.path)

    def read_rows(self) -> CatalogRows:
        text = self._text()
        names = self.columns
        rows, seen = CatalogRows(), {}
        with csv_fields_up_to(len(text)):
            reader = csv.DictReader(io.StringIO(text))
            try:
                self._check_columns(reader.fieldnames or [])
            except csv.Error as error:
                raise ValueError(f"{self.path}: its header line is not valid CSV ({error})") from None
            for line_no, record, reason in _records(reader):
                if record is None:
                    rows.malformed.append((line_no, reason))
                    continue
                values = [record.get(name) for name in (names.id, names.label, names.title, names.image)]
                if any(value is None for value in values):
                    rows.malformed.append((line_no, f"expected {len(reader.fieldnames)} fields, found fewer"))
                    continue
                item = CatalogItem(*(value.strip() for value in values))
                _keep(rows, item, line_no, _row_problem(item, seen, line_no))
        return rows


def _records(reader: csv.DictReader):
    """(line number, record, None) per row of a DictReader, or (line number, None, reason) for a row the csv
    module cannot parse: a counted malformed row, never a traceback. The line is the row's last (rows may span
    lines inside quotes), or for a row that cannot be parsed the line it starts on."""
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # line_num still counts the rows before: this one starts on the next line
            yield reader.line_num + 1, None, f"not valid CSV ({error})"
            continue
        yield reader.line_num, record, None


@contextlib.contextmanager
def csv_fields_up_to(size: int):
    """The csv module's field size limit raised to `size` (never below its default) for the block. Its default,
    131072 characters, turns a long title into a csv.Error; a file's whole text, already in memory, bounds any
    field it holds, so that is a safe bound."""
    before = csv.field_size_limit()
    csv.field_size_limit(max(before, min(size + 1, 2**31 - 1)))  # a C long on every platform
    try:
        yield
    finally:
        csv.field_size_limit(before)


def refuse_duplicated_columns(header: list[str], read: Iterable[str], source) -> None:
    """A header naming a column this tool reads twice is refused: csv.DictReader would silently keep the last."""
    counts = Counter(header)
    duplicated = sorted({name for name in read if name and counts[name] > 1})
    if duplicated:
        raise ValueError(f"{source}: the header names column(s) {', '.join(repr(n) for n in duplicated)} more "
                         "than once, so which one to read is ambiguous; rename or remove the extra column(s)")


# ------------------------------------------------------------------------------------------------- helpers
def _keep(rows: CatalogRows, item: CatalogItem | None, line_no: int, reason: str | None) -> None:
    """A row becomes an item, or a counted malformed row with its reason: never silently dropped."""
    if reason is None:
        rows.items.append(item)
    else:
        rows.malformed.append((line_no, reason))


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


def _row_problem(item: CatalogItem, seen: dict[str, int], line_no: int) -> str | None:
    """Why a parsed row cannot be an item (None if it can). `seen` maps ids to their first line."""
    if not item.id:
        return "empty id"
    if not item.label:
        return "empty label"
    if item.id in seen:
        return f"duplicate id {item.id!r} (first on line {seen[item.id]})"
    seen[item.id] = line_no
    return None


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


def _csv_header(csv_path: str) -> list[str]:
    with open(csv_path, "rb") as handle:
        return [name.strip() for name in handle.readline().decode("utf-8", "replace").lstrip("\ufeff").split(",")]


def is_fashion_header(header: list[str]) -> bool:
    """Whether a CSV header is a Fashion Product Images styles.csv's (it names the fashion columns)."""
    return all(name in header for name in (FASHION_ID, FASHION_LABEL, FASHION_TITLE))


# ---------------------------------------------------------------------------------------------- entry points
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
