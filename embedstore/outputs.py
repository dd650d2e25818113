"""Outputs checked before work starts, and files that appear whole or not at all.

A run that fails only after all its work (an output path that is a folder, a folder it may not write to)
wastes that work; a run that dies mid-write must not leave a half file under the real name.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


def check_writable(path: str | os.PathLike, *, folder: bool) -> None:
    """Refuse an output that cannot be written, as an OSError naming it: a file where a folder goes, a folder
    where a file goes, or a place this process may not write to."""
    path = os.fspath(path)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(errno.EEXIST, "exists and is not a folder (give a folder for the results)", path)
    if not folder and os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder (give a file name to write)", path)
    existing = path if folder and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while existing and not os.path.exists(existing):  # new folders would be made in the nearest existing one
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, "is not a folder, so nothing can be written under it", existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "Permission denied (this folder is not writable)", existing)


@contextlib.contextmanager
def partial_file(path: str | os.PathLike):
    """Yields PATH.partial to write; renames it to PATH on success and removes it on any failure."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def relative_to_folder(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """PATH written relative to FOLDER (a results or report folder), so rows and reports name no machine's
    folders and survive moving the two together."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
