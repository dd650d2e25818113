"""One convention for every trained artefact: a folder with `model.safetensors` + `config.json`.

config.json = {"format": "embedstore-model", "format_version": 1, "kind": KIND, ...the model's own config}.
Kinds: "fusion-head" (heads/estimator.py), "module" (embedstore/modules.py), "end-to-end" (heads/end_to_end.py),
"linear" (heads/decision.py: scikit-learn regressions as arrays).

Writes are atomic for the folder as a whole: everything is written into a temporary folder beside the target,
fsynced, and swapped in with one rename (renameat2 RENAME_EXCHANGE on Linux), so a reader sees the old folder
or the new one, never half of each, and two concurrent writers leave one complete folder (the last swap wins).
Files of the old folder that the new one does not write (training checkpoints, metrics) are carried over as
hard links, so saving a model never deletes a resumable run.

Folders written before this convention (no "format" key, or the old "embedstore-module" /
"embedstore-end-to-end" formats) still load: their kind is read from their shape.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

FORMAT, FORMAT_VERSION = "embedstore-model", 1
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
KINDS = ("fusion-head", "module", "end-to-end", "linear")
# a config.json holds settings and class names (kilobytes): anything near this is no config; and safetensors'
# own limit on a header
MAX_CONFIG_BYTES, MAX_HEADER_BYTES = 64 << 20, 100_000_000
FORMAT_KEYS = ("format", "format_version", "kind")
# the formats of folders written before this convention, and the kind each one is
_LEGACY_FORMATS = {"embedstore-module": "module", "embedstore-end-to-end": "end-to-end"}


def save_pretrained(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict, *, kind: str,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write `folder` = model.safetensors (tensors, on the CPU) + config.json (format keys + `config`) + any
    `extra_files` (name -> text, e.g. metrics.json), atomically. Returns the folder."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
    clash = sorted(set(config) & set(FORMAT_KEYS))
    if clash:
        raise ValueError(f"the model config may not set {', '.join(clash)}: save_pretrained writes them")
    folder = Path(folder)
    with saving(folder):
        return _save(folder, tensors, config, kind, extra_files)


def _save(folder: Path, tensors: dict[str, torch.Tensor], config: dict, kind: str,
          extra_files: dict[str, str] | None) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.writing-"))
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(weights, str(temp / WEIGHTS_FILE))
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, **config}
        (temp / CONFIG_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True, default=_jsonable) + "\n")
        for name, text in (extra_files or {}).items():
            (temp / name).write_text(text)
        written = {WEIGHTS_FILE, CONFIG_FILE, *(extra_files or {})}
        _carry_over(folder, temp, written)
        for path in temp.iterdir():
            _fsync(path)
        _fsync(temp)
        _swap_in(temp, folder)
        _fsync(folder.parent)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # after a swap: the old folder
    return folder


@contextlib.contextmanager
def saving(path: str | os.PathLike):
    """A write that fails while saving to `path` (a full disk, a folder made read-only) as one OSError naming
    `path`, which the CLI prints as one line: safetensors reports its I/O errors as SafetensorError, naming no
    file, and an OSError inside the temporary folder names a path the user never gave."""
    try:
        yield
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))   # "I/O error: No space left on device (os error 28)"
        if code is None:   # not an I/O error (a tensor safetensors cannot hold): a bug to show as it is
            raise
        number = int(code.group(1))
        raise OSError(number, f"{os.strerror(number)} (while saving)", os.fspath(path)) from None
    except OSError as error:
        what = error.strerror or (str(error.args[0]) if error.args else type(error).__name__)
        raise OSError(error.errno or errno.EIO, f"{what} (while saving)", os.fspath(path)) from None


def read_config(folder: str | os.PathLike, kind: str | None = None) -> dict:
    """config.json of a model folder (format keys included; old folders get theirs filled in), checked."""
    return _read(folder, kind, weights=False)[1]


def load_pretrained(folder: str | os.PathLike, kind: str | None = None, *,
                    device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of a model folder; one-line errors for a missing folder, another kind, a newer
    format_version and a truncated or corrupt weights file."""
    tensors, config = _read(folder, kind, weights=True)
    return {k: v.to(device) for k, v in tensors.items()}, config


def checked_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...],
                   folder: str | os.PathLike, *, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
                   finite: bool = True) -> torch.Tensor:
    """tensors[name] (from load_pretrained) as a model kind expects it: present, of one of `dtypes`, of `shape`
    (None: any size along that axis) and, with `finite`, without NaN or inf; otherwise a one-line ValueError
    naming the weights file and the tensor. A kind checks its arrays with this when it loads, so a damaged folder
    is refused there, not as a traceback (or a silent NaN) somewhere in its use."""
    path = Path(folder) / WEIGHTS_FILE
    if name not in tensors:
        raise ValueError(f"{path} has no tensor {name!r}; save the model again")
    tensor = tensors[name]
    if tensor.dtype not in dtypes:
        wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{path}: {name} is {str(tensor.dtype).removeprefix('torch.')}, not {wanted}; save the model "
                         "again")
    if len(tensor.shape) != len(shape) or any(w is not None and g != w for g, w in zip(tensor.shape, shape)):
        wanted = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, not {wanted}; save the model again")
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{path}: {name} holds NaN or inf values; train or save the model again")
    return tensor


def _read(folder, kind: str | None, *, weights: bool) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    for _ in range(10):
        result = _read_once(folder, kind, weights=weights)
        if result is not None:
            return result
    raise OSError(f"{folder} kept being replaced while it was read; try again")


def _read_once(folder: Path, kind: str | None, *, weights: bool):
    """Both files are opened through one handle on the folder, so a writer swapping a new folder in between
    the two reads cannot pair one version's config with the other's weights. None: the folder was replaced
    (and the old one emptied) under us; read again."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def opener(name, flags):  # O_NONBLOCK: opening a named pipe must not wait for a writer (regular files
            return os.open(name, flags | os.O_NONBLOCK, dir_fd=directory)  # ignore the flag)

        try:
            with open(CONFIG_FILE, "rb", opener=opener) as handle:
                config_text = handle.read(_regular_size(handle, folder / CONFIG_FILE, MAX_CONFIG_BYTES) + 1)
            weights_file = open(WEIGHTS_FILE, "rb", opener=opener)
        except FileNotFoundError:
            if _replaced(folder, directory):
                return None
            raise FileNotFoundError(f"{folder} is not a saved model: it needs {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE}") from None
        with weights_file:
            config = _check_config(config_text, folder, kind)
            if not weights:
                return {}, config
            data = _read_weights(weights_file, folder / WEIGHTS_FILE)
    finally:
        os.close(directory)
    try:
        tensors = load(data)
    except (SafetensorError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{folder / WEIGHTS_FILE} is truncated or corrupt ({reason}); save the model again") from None
    return tensors, config


def _regular_size(handle, path: Path, limit: int | None = None) -> int:
    """The size of an open file that must be a regular one: a device (a link to /dev/zero, say), a pipe or a
    folder would be read until memory runs out or forever; a one-line ValueError instead."""
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file (a device, pipe, socket or folder); save the model again")
    if limit is not None and info.st_size > limit:
        raise ValueError(f"{path} is {info.st_size:,} bytes, more than any model config ({limit:,}); save the model "
                         "again")
    return info.st_size


def _read_weights(handle, path: Path) -> bytes:
    """The bytes of a safetensors file, read only once its header (8-byte length, JSON of dtype/shape/offsets
    per tensor) agrees with the file's size: a file whose header describes other sizes is truncated, padded or
    no safetensors file at all, and is refused before it is read into memory."""
    size = _regular_size(handle, path)

    def corrupt(reason: str) -> ValueError:
        return ValueError(f"{path} is truncated or corrupt ({reason}); save the model again")

    head = handle.read(8)
    if len(head) < 8:
        raise corrupt(f"{size} bytes, no safetensors header")
    header_bytes = int.from_bytes(head, "little")
    if header_bytes > min(size - 8, MAX_HEADER_BYTES):
        raise corrupt(f"its header length {header_bytes:,} does not fit in its {size:,} bytes")
    try:
        header = json.loads(handle.read(header_bytes))
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise corrupt("its header is not a safetensors header") from None
    expected = 8 + header_bytes + max(ends, default=0)
    if expected != size:
        raise corrupt(f"its header describes {expected:,} bytes, the file has {size:,}")
    available = _available_memory()
    if available is not None and size > available:  # a sparse file can be any size: fail in one line, not OOM
        raise ValueError(f"{path} is {size / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of memory "
                         "available to load it")
    handle.seek(0)
    return handle.read(size)


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _replaced(folder: Path, directory: int) -> bool:
    try:
        return os.stat(folder).st_ino != os.fstat(directory).st_ino
    except FileNotFoundError:
        return True


def _check_config(text: bytes, folder: Path, kind: str | None) -> dict:
    path = folder / CONFIG_FILE
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); save the model again") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} holds no JSON object; save the model again")
    doc = _with_format_keys(doc, path)
    if doc["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{folder} was written by a newer embedstore (model format_version {doc['format_version']}"
                         f", this one reads up to {FORMAT_VERSION}); upgrade embedstore to load it")
    if kind is not None and doc["kind"] != kind:
        raise ValueError(f"{folder} holds a {doc['kind']} model, not a {kind}")
    return doc


def _with_format_keys(doc: dict, path: Path) -> dict:
    fmt = doc.get("format")
    if fmt == FORMAT:
        if doc.get("kind") not in KINDS or not isinstance(doc.get("format_version"), int):
            raise ValueError(f"{path} names no known kind/format_version ({doc.get('kind')!r}, "
                             f"{doc.get('format_version')!r}); save the model again")
        return doc
    if fmt in _LEGACY_FORMATS:
        return {**doc, "format": FORMAT, "format_version": 1, "kind": _LEGACY_FORMATS[fmt]}
    if fmt is None and isinstance(doc.get("config"), dict) and "strategy" in doc["config"]:
        return {**doc, "format": FORMAT, "format_version": 1, "kind": "fusion-head"}  # `heads sweep` before v1
    raise ValueError(f"{path} is not an embedstore model config (format {fmt!r})")


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _carry_over(folder: Path, temp: Path, written: set[str]) -> None:
    """Keep what else the folder holds (checkpoints, metrics) as hard links, no copies. A concurrent writer
    may swap the folder away mid-walk: then what it held lives on in that writer's folder, and an entry
    that vanished under us is simply not carried."""
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name not in written and not (temp / entry.name).exists():
            try:
                _link_tree(entry, temp / entry.name)
            except FileNotFoundError:
                continue


def _link_tree(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, copy_function=os.link)
    else:
        os.link(source, target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOENT):  # no syscall / filesystem support, or no target yet
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(temp: Path, folder: Path) -> None:
    """Make `temp` be `folder`; the old folder, if any, ends up at `temp` (the caller deletes it)."""
    try:  # one stat: `exists() and not is_dir()` races a writer moving the folder aside in between
        if not stat.S_ISDIR(os.stat(folder).st_mode):
            raise ValueError(f"{folder} exists and is not a folder; choose another output path")
    except FileNotFoundError:
        pass
    if _exchange(temp, folder):
        return
    for _ in range(100):  # no atomic swap: move the old folder aside, then rename; retry if a writer raced us
        try:
            os.rename(temp, folder)  # succeeds when `folder` is absent (or an empty folder)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
        try:
            os.rename(folder, aside / "old")
        except FileNotFoundError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not replace {folder}: other writers kept replacing it")
