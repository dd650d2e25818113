"""Creating and writing the HDF5 feature store (the format and the reader are embedstore/store.py).

Crash safety without a journal: every feature dataset is allocated in full when it is created (fixed shape,
early allocation, NaN fill), so writing a batch touches raw data only and never the file's metadata. A row's
status is set only after its values are flushed, and `complete` is set last. One writer at a time (an flock on
the file); two processes creating one store each build a temporary file and `os.link` it into place.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from embedstore.chunks import check_feature_dtype, chunk_rows_for
from embedstore.outputs import fsync_file
from embedstore.store import (
    FORMAT,
    FORMAT_VERSION,
    IDENTITY_KEYS,
    SHARD_KEYS,
    SPLITS,
    STATUS_NAMES,
    STATUS_NON_FINITE,
    STATUS_OK,
    STATUS_PENDING,
    STATUS_UNREADABLE_IMAGE,
    STR_DTYPE,
    as_str_array,
    decode_attr,
    encode_attr,
    library_versions,
    now_iso,
    open_readonly,
    read_attrs,
    refuse_missing_sources,
)


def create_store(
    path: str | Path,
    *,
    ids: Iterable,
    labels: Iterable[int],
    splits: Iterable[str],
    classes: Iterable[str],
    manifest_sha256: str,
    manifest_json: str = "",
    catalog_spec: Mapping | None = None,
    shard: Mapping[str, int] | None = None,
) -> None:
    """Create the store's item tables, or check that an existing store belongs to the same manifest (and is the
    same shard: `shard` maps every SHARD_KEYS name to its value; None for a store of every item).

    Two processes may create the same new store at once: each builds its own temporary file and links it into
    place without replacing (os.link fails on an existing name), so exactly one wins and the other checks the
    winner's store like any existing one."""
    path = Path(path)
    if path.exists():
        _check_existing(path, manifest_sha256, manifest_json, shard)
        return
    ids, labels, splits, classes = list(ids), np.asarray(list(labels), dtype=np.int32), list(splits), list(classes)
    if not (len(ids) == len(labels) == len(splits)):
        raise ValueError(f"ids, labels and splits differ in length: {len(ids)}, {len(labels)}, {len(splits)}")
    if unknown := sorted(set(splits) - set(SPLITS)):
        raise ValueError(f"unknown split names {unknown}; expected {list(SPLITS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of this process's own: a shared ".creating" name let two creators truncate each other's file
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".creating")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        with _store_errors(path, "cannot create the store ({error})"), h5py.File(tmp, "w", locking=False) as f:
            f.attrs.update(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "manifest_sha256": manifest_sha256,
                    "manifest": manifest_json,
                    "items_identity": manifest_identity(manifest_json) if manifest_json else "",
                    "catalog": encode_attr(dict(catalog_spec or {})),
                    "created": now_iso(),
                    "library_versions": encode_attr(library_versions()),
                    **dict(shard or {}),
                }
            )
            items = f.create_group("items")
            items.create_dataset("id", data=as_str_array(ids), dtype=STR_DTYPE)
            items.create_dataset("label", data=labels)
            items.create_dataset("split", data=as_str_array(splits), dtype=STR_DTYPE)
            f.create_dataset("classes", data=as_str_array(classes), dtype=STR_DTYPE)
            f.create_group("features")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a store is as shareable as any file written
        with _store_errors(path, "cannot create the store ({error})"):
            fsync_file(tmp)  # on disk before its name appears
        try:
            os.link(tmp, path)  # the store appears whole or not at all, and never replaces another's
        except FileExistsError:
            _check_existing(path, manifest_sha256, manifest_json, shard)  # another process created it first
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _store_errors(path: Path, doing: str):
    """An OSError of h5py (a full disk, a vanished mount) names no file: raise it naming the store, saying
    `doing` ("... ({error}) ...": its first line in the parentheses)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno or errno.EIO, doing.format(error=str(error).splitlines()[0] if str(error) else
                                                             type(error).__name__), str(path)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def manifest_identity(manifest_json: str) -> str:
    """sha256 of a manifest's content less its catalog's location: which items, classes, labels and splits a
    store holds. A catalog moved elsewhere (its path fixed in the manifest) keeps the same identity."""
    try:
        doc = json.loads(manifest_json)
    except json.JSONDecodeError:
        return ""
    if not isinstance(doc, dict):
        return ""
    doc.pop("catalog", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _check_existing(path: Path, manifest_sha256: str, manifest_json: str, shard: Mapping | None) -> None:
    with open_readonly(path) as f:
        existing = decode_attr(f.attrs.get("manifest_sha256", ""))
        # stores made before items_identity was recorded still hold their manifest's text: derive it from that
        stored_json = f.attrs.get("manifest", "")
        stored_json = stored_json.decode("utf-8") if isinstance(stored_json, bytes) else str(stored_json)
        stored_identity = decode_attr(f.attrs.get("items_identity", "")) or (
            manifest_identity(stored_json) if stored_json else "")
        existing_shard = {key: decode_attr(f.attrs[key]) for key in SHARD_KEYS if key in f.attrs}
    same_items = existing == manifest_sha256 or (
        bool(stored_identity) and bool(manifest_json) and stored_identity == manifest_identity(manifest_json))
    if not same_items:
        raise ValueError(
            f"{path} was built from another manifest (sha256 {existing[:12]}…, this one {manifest_sha256[:12]}…); "
            "features of different item sets cannot share a store: choose another --store path"
        )
    if existing_shard != dict(shard or {}):
        # its rows are another part of the manifest: resuming into it would misalign every row
        raise ValueError(f"{path} holds {describe_rows(existing_shard)}, not {describe_rows(shard)}; "
                         "choose another --store path or the matching --shard")


def describe_rows(shard: Mapping | None) -> str:
    """'shard 1 of 4 (rows 25..49 of 100)', or 'every manifest item' for a whole store."""
    if not shard:
        return "every manifest item (no shard)"
    return (f"shard {shard['shard_index']} of {shard['shard_count']} (rows {shard['shard_row_start']}.."
            f"{shard['shard_row_stop'] - 1} of {shard['total_items']})")


def _allocated_dataset(group: h5py.Group, name: str, shape: tuple, dtype, fill,
                       chunks: tuple | None = None) -> h5py.Dataset:
    """A fixed-shape dataset whose storage (every chunk, when chunked) is allocated and filled now, so later
    writes are raw data only."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill, dcpl=dcpl, chunks=chunks)


class FeatureSetWriter:
    """Writes one source's layers (e.g. a backbone's `pooled`, or a module's `dense` + `classifier`).

    The single writer of a store. Use as a context manager; `pending_rows()` says what is left to do, `write()`
    stores a batch, `finish()` marks the sets complete once no row is pending.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        modality: str,
        source: str,
        layers: Mapping[str, int],
        provenance: Mapping[str, Mapping],
        add: bool = False,
        dtype: str = "float32",
    ):
        self.path = Path(path)
        self.modality, self.source = modality, source
        self.layers = dict(layers)
        self.dtype = check_feature_dtype(dtype)   # how values are stored; readers upcast to float32
        self._file = None
        self._lock = _take_writer_lock(self.path)
        try:
            # HDF5's own lock is off for every open of a store (readers and the writer alike): HDF5 refuses to
            # open one file twice in a process with different locking flags; our flock enforces the one writer.
            self._file = _open_for_writing(self.path)
            refuse_missing_sources(self._file, self.path)
            with _store_errors(self.path, f"cannot add {modality}/{source} to the store ({{error}}); "
                                            "a rerun resumes"):
                self._group = self._open_or_create(modality, source, provenance, add)
        except BaseException:
            self.close()
            raise

    def _open_or_create(self, modality, source, provenance, add) -> h5py.Group:
        n_items = self._file["items/id"].shape[0]
        manifest_sha256 = decode_attr(self._file.attrs["manifest_sha256"])
        group_path = f"features/{modality}/{source}"
        if group_path in self._file:
            self._check_same_provenance(group_path, provenance)
        else:
            self._refuse_other_sources_unless_add(add)
            group = self._file.require_group(group_path)
            try:
                itemsize = np.dtype(self.dtype).itemsize
                for layer, dim in self.layers.items():
                    rows = chunk_rows_for(dim, itemsize, n_items)
                    dataset = _allocated_dataset(group, layer, (n_items, dim), self.dtype, np.nan,
                                                 chunks=(rows, dim) if n_items else None)
                    attrs = {**provenance[layer], "manifest_sha256": manifest_sha256, "layer": layer,
                             "dtype": self.dtype, "feature_dim": dim, "chunk_rows": rows, "complete": False}
                    dataset.attrs.update({k: encode_attr(v) for k, v in attrs.items()})
                _allocated_dataset(group, "status", (n_items,), np.int8, STATUS_PENDING)
                group.attrs["complete"] = False
                self._file.flush()
            except BaseException:
                # a half-made set (a full disk mid-allocation) would make every rerun refuse it as "no layer"
                with contextlib.suppress(Exception):
                    del self._file[group_path]
                    self._file.flush()
                raise
        return self._file[group_path]

    def _check_same_provenance(self, group_path: str, provenance: Mapping[str, Mapping]) -> None:
        group = self._file[group_path]
        for layer in self.layers:
            if layer not in group:
                raise ValueError(f"{self.path}: {group_path} has no layer {layer!r}; it holds {sorted(group)}")
            stored = read_attrs(group[layer])
            wanted = {**provenance[layer], "layer": layer, "dtype": self.dtype,
                      "manifest_sha256": stored.get("manifest_sha256")}
            for key in IDENTITY_KEYS:
                if stored.get(key) != decode_attr(encode_attr(wanted.get(key))):
                    raise ValueError(
                        f"{self.path} already holds {group_path}/{layer} with another {key} "
                        f"({stored.get(key)!r}, now {wanted.get(key)!r}); refusing to mix them: "
                        "extract into another --store, or name this source differently"
                    )

    def _refuse_other_sources_unless_add(self, add: bool) -> None:
        existing = [f"{self.modality}/{s}" for s in self._file["features"].get(self.modality, {})]
        if existing and not add:
            raise ValueError(
                f"{self.path} already holds {', '.join(existing)}; refusing to write {self.modality}/{self.source} "
                "into it. Pass --add to store it beside the existing feature sets, or use another --store"
            )

    # -- the write loop
    @property
    def status(self) -> np.ndarray:
        return self._group["status"][:]

    def pending_rows(self) -> np.ndarray:
        return np.flatnonzero(self.status == STATUS_PENDING)

    def write(self, rows: np.ndarray, values: Mapping[str, np.ndarray], status: np.ndarray) -> None:
        """Store a batch: `rows` (n,) increasing row indices, `values[layer]` (n, D) for the rows whose status
        is ok (in order), `status` (n,) int8. Values are flushed before the statuses that vouch for them."""
        rows, status = np.asarray(rows), np.asarray(status, dtype=np.int8)
        ok_index = np.flatnonzero(status == STATUS_OK)
        if ok_index.size and values:
            # a NaN or inf row is never vouched for as ok: it would train every head into NaN without a word
            finite = np.logical_and.reduce([np.isfinite(np.asarray(m)).all(axis=1) for m in values.values()])
            if not finite.all():
                status = status.copy()
                status[ok_index[~finite]] = STATUS_NON_FINITE
        ok_rows = rows[ok_index]
        try:
            if ok_rows.size:
                for layer, matrix in values.items():
                    _write_rows(self._group[layer], ok_rows, self._stored(layer, matrix))
                self._file.flush()
            _write_rows(self._group["status"], rows, status)
            self._file.flush()
        except OSError as error:  # a full disk, a vanished mount: h5py's message names no file
            raise OSError(error.errno or errno.EIO, f"cannot write to the store ({str(error).splitlines()[0]}); "
                          "rows written so far are kept and a rerun resumes", str(self.path)) from None

    def _stored(self, layer: str, matrix) -> np.ndarray:
        """The values in the stored dtype; a finite value that float16 cannot hold is refused, not made inf."""
        matrix = np.asarray(matrix)
        with np.errstate(over="ignore"):   # an overflow is reported below, as a one-line error
            stored = matrix.astype(self.dtype, copy=False)
        if self.dtype != "float32" and not np.array_equal(np.isfinite(stored), np.isfinite(matrix)):
            raise ValueError(f"{self.modality}/{self.source}/{layer} has values beyond {self.dtype}'s range "
                             f"(largest {np.nanmax(np.abs(matrix)):.4g}); extract with --dtype float32")
        return stored

    def finish(self) -> bool:
        """Mark the layers complete if no row is pending; returns whether they are."""
        status = self.status
        complete = not bool((status == STATUS_PENDING).any())
        counts = {STATUS_NAMES[code]: int((status == code).sum()) for code in STATUS_NAMES}
        with _store_errors(self.path, "cannot record the finished rows ({error}); a rerun resumes"):
            for layer in self.layers:
                self._group[layer].attrs["complete"] = complete
            self._group.attrs["counts"] = encode_attr(counts)
            self._group.attrs["complete"] = complete
            self._file.flush()
        return complete

    def close(self) -> None:
        if self._file is not None and self._file.id.valid:
            self._file.close()
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _take_writer_lock(path: Path) -> int:
    """An exclusive, non-blocking flock on the store file: one writer at a time, readers unaffected."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ValueError(f"another process is writing to {path}; a store has one writer at a time") from None
    return descriptor


def _open_for_writing(path: Path) -> h5py.File:
    """The store opened read-write, or an OSError naming it (h5py's own message names no file)."""
    if not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "cannot write to the store (resuming it needs write access)", str(path))
    try:
        return h5py.File(path, "r+", locking=False)
    except OSError as error:
        raise OSError(error.errno or errno.EIO, f"cannot open the store for writing ({str(error).splitlines()[0]})",
                      str(path)) from None


def _write_rows(dataset: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    """h5py writes a contiguous run as one slice (fast) and needs increasing indices otherwise."""
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        dataset[rows[0] : rows[-1] + 1] = values
    else:
        dataset[np.sort(rows)] = values[np.argsort(rows)]


def write_store_from_arrays(
    path: str | Path,
    *,
    ids: Iterable,
    labels: Iterable[int],
    splits: Iterable[str],
    classes: Iterable[str],
    features: Mapping[str, tuple[np.ndarray, Mapping]],
    manifest_sha256: str = "synthetic",
    dtype: str = "float32",
) -> Path:
    """Build a complete store from in-memory arrays: `features[name] = (matrix (N, D), provenance)` with
    name "<modality>/<source>/<layer>". For tests and synthetic benchmarks; rows with NaN are marked skipped."""
    ids = list(ids)
    create_store(path, ids=ids, labels=labels, splits=splits, classes=classes, manifest_sha256=manifest_sha256)
    by_source: dict[tuple[str, str], dict[str, tuple[np.ndarray, Mapping]]] = {}
    for name, (matrix, provenance) in features.items():
        modality, source, layer = name.split("/")
        by_source.setdefault((modality, source), {})[layer] = (np.asarray(matrix), provenance)
    for (modality, source), layers in by_source.items():
        provenance = {layer: {"backbone": source, "weights_id": "synthetic", "preprocessing": {}, **dict(p)}
                      for layer, (_, p) in layers.items()}
        with FeatureSetWriter(path, modality=modality, source=source, add=True, provenance=provenance,
                              layers={layer: m.shape[1] for layer, (m, _) in layers.items()}, dtype=dtype) as writer:
            first = next(iter(layers.values()))[0]
            ok = ~np.isnan(first).any(axis=1)
            status = np.where(ok, STATUS_OK, STATUS_UNREADABLE_IMAGE).astype(np.int8)
            writer.write(np.arange(len(ids)), {layer: m[ok] for layer, (m, _) in layers.items()}, status)
            writer.finish()
    return Path(path)
