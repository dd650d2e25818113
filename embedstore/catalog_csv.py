"""The "csv" catalog format: any CSV file whose id, image, title and label columns are named by `CsvColumns`;
image paths are relative to the CSV's folder, or absolute.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass

from embedstore.catalog_base import (Catalog, CatalogItem, CatalogRows, csv_fields_up_to, keep_row,
                                     refuse_duplicated_columns, row_problem)
from embedstore.catalog_files import FolderFiles


@dataclass(frozen=True)
class CsvColumns:
    """Names of the columns a generic CSV catalog reads."""

    id: str = "id"
    image: str = "image"
    title: str = "title"
    label: str = "label"


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
                keep_row(rows, item, line_no, row_problem(item, seen, line_no))
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
