"""Where a catalog's files come from: a folder, or a folder inside a zip (read in place, never unpacked).

Both answer `exists(ref)` and `read(ref)` for refs relative to the catalog's root (an absolute ref, in a folder, is
used as is). A zip's handle is opened lazily in each process and never pickled, because DataLoader worker processes
read images through it.
"""
from __future__ import annotations

import os
import zipfile


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


class ZipFiles:
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
