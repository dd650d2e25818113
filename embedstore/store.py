"""The HDF5 feature store: layout, provenance, one writer and any number of readers.

Layout (readable with plain h5py; see docs/ARCHITECTURE.md):

    /items/id, /items/label, /items/split, /classes           every manifest item, manifest order
    /features/<modality>/<source>/<layer>                      (N, D) float32 or float16, row-chunked,
                                                               provenance in attrs
    /features/<modality>/<source>/status                       (N,) int8, see STATUS_NAMES

A shard (`embed extract --shard k/n`, see shards.py) is a store of the same layout holding one contiguous
range of the manifest's rows, its range in the root attributes SHARD_KEYS. A merged store's feature and
status datasets are HDF5 virtual datasets reading from the shard files beside it.

Crash safety without a journal: every feature dataset is allocated in full when it is created (fixed shape,
early allocation, NaN fill), so writing a batch touches raw data only and never the file's metadata. A row's
status is set only after its values are flushed. A killed writer therefore leaves rows that are either
finished (status set, values on disk) or pending (redone on resume), never half-counted ones. `complete` is
an attribute set last, so a half-written store is never mistaken for a complete one.

Row chunks (embedstore/chunks.py): feature datasets are stored in uncompressed chunks of whole rows, each
chunk allocated at creation like the rest (a compressed chunk would change size when rewritten, and a batch write
would then touch the file's metadata). Stores written before chunking stay readable (contiguous datasets).
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from embedstore.chunks import check_feature_dtype, chunk_rows_for, read_rows

FORMAT = "embedstore-feature-store"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")

(STATUS_PENDING, STATUS_OK, STATUS_MISSING_IMAGE, STATUS_UNREADABLE_IMAGE, STATUS_EMPTY_TITLE, STATUS_NON_FINITE,
 STATUS_IMAGE_TOO_LARGE) = range(7)
STATUS_NAMES = {
    STATUS_PENDING: "pending",
    STATUS_OK: "ok",
    STATUS_MISSING_IMAGE: "skipped: missing image",
    STATUS_UNREADABLE_IMAGE: "skipped: unreadable image",
    STATUS_EMPTY_TITLE: "skipped: empty title",
    STATUS_NON_FINITE: "skipped: non-finite features",   # the network gave NaN or inf for this item
    STATUS_IMAGE_TOO_LARGE: "skipped: image too large",  # more pixels than PIL's decompression-bomb limit
}
# What every store holds; a file lacking one of these is not a store (or a damaged one).
REQUIRED_MEMBERS = ("items/id", "items/label", "items/split", "classes", "features")


class DataWarning(UserWarning):
    """Data left out and counted (e.g. non-finite rows); the CLI prints these as one line."""
# Provenance keys that identify what a feature matrix is; a mismatch in any of them means "other features".
IDENTITY_KEYS = ("backbone", "weights_id", "layer", "preprocessing", "dtype", "manifest_sha256")
# Root attributes of a shard: which part of the manifest's rows [shard_row_start, shard_row_stop) of total_items.
SHARD_KEYS = ("shard_index", "shard_count", "shard_row_start", "shard_row_stop", "total_items")

_STR = h5py.string_dtype("utf-8")


def library_versions() -> dict[str, str]:
    import torch
    import torchvision
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "numpy": np.__version__,
    }


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def feature_set_name(modality: str, source: str, layer: str) -> str:
    return f"{modality}/{source}/{layer}"


def _encode_attr(value):
    """HDF5 attributes hold scalars and strings; nested values are stored as JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def _decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_attrs(obj) -> dict:
    return {key: _decode_attr(obj.attrs[key]) for key in obj.attrs}


def _as_str_array(values: Iterable) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


# ----------------------------------------------------------------------------------------------- creating


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
        with h5py.File(tmp, "w", locking=False) as f:
            f.attrs.update(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "manifest_sha256": manifest_sha256,
                    "manifest": manifest_json,
                    "items_identity": manifest_identity(manifest_json) if manifest_json else "",
                    "catalog": _encode_attr(dict(catalog_spec or {})),
                    "created": now_iso(),
                    "library_versions": _encode_attr(library_versions()),
                    **dict(shard or {}),
                }
            )
            items = f.create_group("items")
            items.create_dataset("id", data=_as_str_array(ids), dtype=_STR)
            items.create_dataset("label", data=labels)
            items.create_dataset("split", data=_as_str_array(splits), dtype=_STR)
            f.create_dataset("classes", data=_as_str_array(classes), dtype=_STR)
            f.create_group("features")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a store is as shareable as any file written
        try:
            os.link(tmp, path)  # the store appears whole or not at all, and never replaces another's
        except FileExistsError:
            _check_existing(path, manifest_sha256, manifest_json, shard)  # another process created it first
    finally:
        tmp.unlink(missing_ok=True)


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
    with _open_readonly(path) as f:
        existing = _decode_attr(f.attrs.get("manifest_sha256", ""))
        # stores made before items_identity was recorded still hold their manifest's text: derive it from that
        stored_json = f.attrs.get("manifest", "")
        stored_json = stored_json.decode("utf-8") if isinstance(stored_json, bytes) else str(stored_json)
        stored_identity = _decode_attr(f.attrs.get("items_identity", "")) or (
            manifest_identity(stored_json) if stored_json else "")
        existing_shard = {key: _decode_attr(f.attrs[key]) for key in SHARD_KEYS if key in f.attrs}
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
            _refuse_missing_sources(self._file, self.path)
            self._group = self._open_or_create(modality, source, provenance, add)
        except BaseException:
            self.close()
            raise

    def _open_or_create(self, modality, source, provenance, add) -> h5py.Group:
        n_items = self._file["items/id"].shape[0]
        manifest_sha256 = _decode_attr(self._file.attrs["manifest_sha256"])
        group_path = f"features/{modality}/{source}"
        if group_path in self._file:
            self._check_same_provenance(group_path, provenance)
        else:
            self._refuse_other_sources_unless_add(add)
            group = self._file.require_group(group_path)
            itemsize = np.dtype(self.dtype).itemsize
            for layer, dim in self.layers.items():
                rows = chunk_rows_for(dim, itemsize, n_items)
                dataset = _allocated_dataset(group, layer, (n_items, dim), self.dtype, np.nan,
                                             chunks=(rows, dim) if n_items else None)
                attrs = {**provenance[layer], "manifest_sha256": manifest_sha256, "layer": layer,
                         "dtype": self.dtype, "feature_dim": dim, "chunk_rows": rows, "complete": False}
                dataset.attrs.update({k: _encode_attr(v) for k, v in attrs.items()})
            _allocated_dataset(group, "status", (n_items,), np.int8, STATUS_PENDING)
            group.attrs["complete"] = False
            self._file.flush()
        return self._file[group_path]

    def _check_same_provenance(self, group_path: str, provenance: Mapping[str, Mapping]) -> None:
        group = self._file[group_path]
        for layer in self.layers:
            if layer not in group:
                raise ValueError(f"{self.path}: {group_path} has no layer {layer!r}; it holds {sorted(group)}")
            stored = _read_attrs(group[layer])
            wanted = {**provenance[layer], "layer": layer, "dtype": self.dtype,
                      "manifest_sha256": stored.get("manifest_sha256")}
            for key in IDENTITY_KEYS:
                if stored.get(key) != _decode_attr(_encode_attr(wanted.get(key))):
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
        for layer in self.layers:
            self._group[layer].attrs["complete"] = complete
        self._group.attrs["counts"] = _encode_attr(counts)
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


# ----------------------------------------------------------------------------------------------- reading


def _open_readonly(path: Path) -> h5py.File:
    """Readers do not take HDF5's file lock, so they can run beside the single writer (which only ever
    appends complete rows to preallocated storage; readers trust only sets marked complete)."""
    if not path.exists():
        raise FileNotFoundError(f"no feature store at {path}; create one with `embed extract MANIFEST --store {path}`")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file ({error})") from None
    if _decode_attr(f.attrs.get("format", "")) != FORMAT:
        f.close()
        raise ValueError(f"{path} is an HDF5 file but not an embedstore feature store (no format={FORMAT!r})")
    if missing := [name for name in REQUIRED_MEMBERS if name not in f]:
        f.close()
        raise ValueError(f"{path} is not a usable feature store: it lacks /{', /'.join(missing)} (a damaged or "
                         "foreign file); extract into a new --store")
    return f


def _refuse_missing_sources(file: h5py.File, path: Path) -> None:
    """A merged store's virtual datasets read from shard files; HDF5 silently fills the rows of a missing one
    (NaN features, status pending), so a moved or partial folder must fail loudly instead."""
    missing = set()

    def check(_, obj):
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            for source in obj.virtual_sources():
                # relative names resolve against the merged store's folder (HDF5's default after HDF5_VDS_PREFIX)
                if source.file_name != "." and not (path.parent / source.file_name).is_file():
                    missing.add(source.file_name)

    file["features"].visititems(check)
    if missing:
        file.close()
        raise FileNotFoundError(
            f"{path} is a merged store whose rows live in shard files beside it, and {', '.join(sorted(missing))} "
            f"is not in {path.parent}: move the shard files back beside it (or merge again with `embed merge`)")


@dataclass
class FeatureSetInfo:
    name: str
    modality: str
    source: str
    layer: str
    dim: int
    dtype: str
    provenance: dict
    complete: bool
    counts: dict = field(default_factory=dict)


@dataclass
class LoadedFeatures:
    features: dict[str, np.ndarray]  # name -> (n, D) float32 (the stored dtype with upcast=False)
    labels: np.ndarray  # (n,) int64
    split: np.ndarray  # (n,) str
    ids: np.ndarray  # (n,) str
    skipped: int  # rows left out because some named set skipped them (non-finite rows included)
    non_finite: dict[str, int] = field(default_factory=dict)  # name -> rows marked ok that hold NaN/inf (left out)


class FeatureStore:
    """Read-only view of a store. `load()` aligns rows across feature sets and refuses incomplete sets."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = _open_readonly(self.path)
        _refuse_missing_sources(self._file, self.path)
        self.attrs = _read_attrs(self._file)
        self.manifest_sha256: str = self.attrs["manifest_sha256"]
        self.classes: list[str] = [c.decode() if isinstance(c, bytes) else c for c in self._file["classes"][:]]
        self.ids = self._file["items/id"].asstr()[:]
        self.labels = self._file["items/label"][:].astype(np.int64)
        self.split = self._file["items/split"].asstr()[:]

    @property
    def feature_sets(self) -> dict[str, FeatureSetInfo]:
        sets = {}
        features = self._file["features"]
        for modality, sources in features.items():
            for source, group in sources.items():
                group_attrs = _read_attrs(group)
                for layer, dataset in group.items():
                    if layer == "status":
                        continue
                    provenance = _read_attrs(dataset)
                    name = feature_set_name(modality, source, layer)
                    sets[name] = FeatureSetInfo(
                        name=name, modality=modality, source=source, layer=layer, dim=int(dataset.shape[1]),
                        dtype=str(dataset.dtype), provenance=provenance, complete=bool(provenance.get("complete")),
                        counts=group_attrs.get("counts") or self._count_status(group),
                    )
        return sets

    @staticmethod
    def _count_status(group: h5py.Group) -> dict:
        status = group["status"][:]
        return {STATUS_NAMES[code]: int((status == code).sum()) for code in STATUS_NAMES}

    @property
    def complete(self) -> bool:
        sets = self.feature_sets
        return bool(sets) and all(info.complete for info in sets.values())

    def find(self, modality: str, layer: str, source: str | None = None) -> str:
        """The one feature set of this modality and layer (and source, if given)."""
        matches = [
            info.name for info in self.feature_sets.values()
            if info.modality == modality and info.layer == layer and (source is None or info.source == source)
        ]
        if len(matches) == 1:
            return matches[0]
        held = ", ".join(sorted(self.feature_sets)) or "no feature sets"
        if not matches:
            raise ValueError(f"{self.path} has no {modality} '{layer}' features (it holds {held})")
        raise ValueError(f"{self.path} holds several {modality} '{layer}' feature sets ({', '.join(matches)}); name the source")

    def status(self, name: str) -> np.ndarray:
        modality, source, _ = name.split("/")
        return self._file[f"features/{modality}/{source}/status"][:]

    def dataset(self, name: str) -> h5py.Dataset:
        """The h5py dataset of a feature set (streaming readers slice it in row blocks)."""
        return self._file[f"features/{name}"]

    def ok_rows(self, names: Iterable[str], *, allow_incomplete: bool = False) -> np.ndarray:
        """(n,) increasing row indices whose status is ok in every named set; refuses unknown/incomplete sets."""
        sets = self.feature_sets
        ok = np.ones(len(self.ids), dtype=bool)
        for name in names:
            if name not in sets:
                raise ValueError(f"{self.path} has no feature set {name!r}; it holds {', '.join(sorted(sets))}")
            if not sets[name].complete and not allow_incomplete:
                raise ValueError(f"feature set {name} in {self.path} is incomplete; finish it with `embed extract` (it resumes)")
            ok &= self.status(name) == STATUS_OK
        return np.flatnonzero(ok)

    def load(self, names: Iterable[str], *, allow_incomplete: bool = False, upcast: bool = True) -> LoadedFeatures:
        """The rows ok in every named set, as (n, D) arrays: float32 (upcast), or as stored (upcast=False: a
        float16 store stays half the memory, and the caller upcasts per batch). Read in row blocks into the
        result, so the peak is the result plus one block, not twice the matrix. Rows marked ok that hold NaN or
        inf (an older writer, or a hand edit) are left out and counted, with a warning naming the set."""
        names = list(names)
        rows = self.ok_rows(names, allow_incomplete=allow_incomplete)
        features = {name: read_rows(self.dataset(name), rows, np.float32 if upcast else None) for name in names}
        finite = np.ones(len(rows), dtype=bool)
        non_finite = {}
        for name, matrix in features.items():
            row_finite = np.isfinite(matrix).all(axis=1)  # (n,)
            if not row_finite.all():
                non_finite[name] = int((~row_finite).sum())
                warnings.warn(f"{self.path}: feature set {name} has {non_finite[name]} rows marked ok that hold "
                              "NaN or inf; they are left out (extract into a new --store to recompute them)",
                              DataWarning, stacklevel=2)
            finite &= row_finite
        if not finite.all():
            rows = rows[finite]
            features = {name: matrix[finite] for name, matrix in features.items()}
        return LoadedFeatures(features=features, labels=self.labels[rows], split=self.split[rows],
                              ids=self.ids[rows], skipped=len(self.ids) - len(rows), non_finite=non_finite)

    def arrays(self, split: str, names: Iterable[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """(list of X, y) for one split: X (n, D) float32 per named set, in the order named, over the rows ok in
        every named set (as `load`); y (n,) the class names. Ready for heads.FusionHead.fit / score."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if isinstance(names, str):
            names = [names]
        names = list(names)
        data = self.load(names)
        rows = data.split == split
        return [data.features[n][rows] for n in names], np.asarray(self.classes)[data.labels[rows]]

    def non_finite_rows(self, name: str, chunk: int = 8192) -> int:
        """Rows of a feature set marked ok whose values hold NaN or inf (a damaged store), read in chunks."""
        ok = self.status(name) == STATUS_OK
        dataset = self._file[f"features/{name}"]
        bad = 0
        for begin in range(0, len(ok), chunk):
            block = dataset[begin : begin + chunk]  # (chunk, D)
            bad += int((ok[begin : begin + chunk] & ~np.isfinite(block).all(axis=1)).sum())
        return bad

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
