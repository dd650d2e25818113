"""What every catalog format shares: the item, the rows a catalog's table becomes (items, or malformed rows with
their reason: never dropped silently), the Catalog interface the formats implement, and the rules their readers
apply (an id once, a label present, csv's field size limit raised for a read, a column read twice refused).

Every catalog answers the same four questions (`read_rows`, `has_image`, `read_image_bytes`, `spec`) so the
manifest and the extractor never care which format they read (embedstore/catalog.py opens one).
"""
from __future__ import annotations

import contextlib
import csv
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable


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


def keep_row(rows: CatalogRows, item: CatalogItem | None, line_no: int, reason: str | None) -> None:
    """A row becomes an item, or a counted malformed row with its reason: never silently dropped."""
    if reason is None:
        rows.items.append(item)
    else:
        rows.malformed.append((line_no, reason))


def row_problem(item: CatalogItem, seen: dict[str, int], line_no: int) -> str | None:
    """Why a parsed row cannot be an item (None if it can). `seen` maps ids to their first line."""
    if not item.id:
        return "empty id"
    if not item.label:
        return "empty label"
    if item.id in seen:
        return f"duplicate id {item.id!r} (first on line {seen[item.id]})"
    seen[item.id] = line_no
    return None
