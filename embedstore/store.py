"""The HDF5 feature store: layout, provenance, one writer (store_writer.py) and any number of readers.

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
import json
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from embedstore.chunks import block_rows, read_rows

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

STR_DTYPE = h5py.string_dtype("utf-8")


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


def encode_attr(value):
    """HDF5 attributes hold scalars and strings; nested values are stored as JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def decode_attr(value):
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


def read_attrs(obj) -> dict:
    return {key: decode_attr(obj.attrs[key]) for key in obj.attrs}


def as_str_array(values: Iterable) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


# ----------------------------------------------------------------------------------------------- reading


def open_readonly(path: Path) -> h5py.File:
    """Readers do not take HDF5's file lock, so they can run beside the single writer (which only ever
    appends complete rows to preallocated storage; readers trust only sets marked complete)."""
    if not path.exists():
        raise FileNotFoundError(f"no feature store at {path}; create one with `embed extract MANIFEST --store {path}`")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file ({error})") from None
    if decode_attr(f.attrs.get("format", "")) != FORMAT:
        f.close()
        raise ValueError(f"{path} is an HDF5 file but not an embedstore feature store (no format={FORMAT!r})")
    if missing := [name for name in REQUIRED_MEMBERS if name not in f]:
        f.close()
        raise ValueError(f"{path} is not a usable feature store: it lacks /{', /'.join(missing)} (a damaged or "
                         "foreign file); extract into a new --store")
    return f


def label_problem(labels: np.ndarray, classes: list) -> str | None:
    """What is wrong with a store's item labels (indices into its classes), or None: '3 item labels lie outside
    0..5 (its 6 classes), e.g. -1, 99'."""
    bad = (labels < 0) | (labels >= len(classes))
    if not bad.any():
        return None
    examples = ", ".join(str(v) for v in np.unique(labels[bad])[:3])
    where = f"0..{len(classes) - 1} (its {len(classes)} classes)" if classes else "any class (it has no classes)"
    return f"{int(bad.sum())} item labels lie outside {where}, e.g. {examples}"


def refuse_missing_sources(file: h5py.File, path: Path) -> None:
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

    def __init__(self, path: str | Path, *, check_labels: bool = True):
        """Open a store; a label outside its classes is a one-line ValueError (`check_labels=False`: opened
        anyway, for `embed inspect` to describe the damage)."""
        self.path = Path(path)
        self._feature_sets: dict[str, FeatureSetInfo] | None = None   # read on first use (feature_sets)
        self._file = open_readonly(self.path)
        refuse_missing_sources(self._file, self.path)
        self.attrs = read_attrs(self._file)
        self.manifest_sha256: str = self.attrs["manifest_sha256"]
        self.classes: list[str] = [c.decode() if isinstance(c, bytes) else c for c in self._file["classes"][:]]
        self.ids = self._file["items/id"].asstr()[:]
        self.labels = self._file["items/label"][:].astype(np.int64)
        self.split = self._file["items/split"].asstr()[:]
        if check_labels and (problem := label_problem(self.labels, self.classes)):
            # checked once here: an out-of-range label would crash a sweep (IndexError) or, as -1, be scored
            self.close()
            raise ValueError(f"{self.path}: {problem}; the store is damaged: extract into a new --store")

    @property
    def feature_sets(self) -> dict[str, FeatureSetInfo]:
        """name -> FeatureSetInfo of every set, read once per opened store (a copy of the dict each call).
        Read afresh, it cost ~15 ms of HDF5 attribute reads per call on a small store and was asked for hundreds
        of times per sweep (a sixth of `embed paper`'s time in tests). One snapshot per view is also what a
        sweep plans with: a set that `embed extract --add` completes later is seen by the next opened store,
        as a set being written was never trusted before (`refresh()` re-reads it in this view)."""
        if self._feature_sets is None:
            self._feature_sets = self._read_feature_sets()
        return dict(self._feature_sets)

    def refresh(self) -> None:
        """Forget the feature sets read so far: the next `feature_sets` reads them from the file again."""
        self._feature_sets = None

    def _read_feature_sets(self) -> dict[str, FeatureSetInfo]:
        sets = {}
        features = self._file["features"]
        for modality, sources in features.items():
            for source, group in sources.items():
                group_attrs = read_attrs(group)
                for layer, dataset in group.items():
                    if layer == "status":
                        continue
                    provenance = read_attrs(dataset)
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
        keep, non_finite = leave_out_non_finite(self.path, {name: np.isfinite(matrix).all(axis=1)  # (n,) each
                                                            for name, matrix in features.items()}, len(rows))
        if not keep.all():
            rows = rows[keep]
            features = {name: matrix[keep] for name, matrix in features.items()}
        return LoadedFeatures(features=features, labels=self.labels[rows], split=self.split[rows],
                              ids=self.ids[rows], skipped=len(self.ids) - len(rows), non_finite=non_finite)

    def finite_ok_rows(self, names: Iterable[str], *, allow_incomplete: bool = False) -> tuple[np.ndarray, dict]:
        """(rows, {set: rows left out}): the rows `load` keeps, found without holding the features (streamed
        heads): ok in every named set, less those holding NaN or inf (`leave_out_non_finite`, the same rule and
        warning). One pass over the named sets' ok rows, a row block at a time."""
        names = list(names)
        rows = self.ok_rows(names, allow_incomplete=allow_incomplete)
        keep, non_finite = leave_out_non_finite(self.path, {name: _finite_rows(self.dataset(name), rows)
                                                            for name in names}, len(rows))
        return rows[keep], non_finite

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


def leave_out_non_finite(path, finite: dict[str, np.ndarray], n_rows: int) -> tuple[np.ndarray, dict[str, int]]:
    """The one rule for rows marked ok whose features hold NaN or inf (an older writer, a hand edit), for heads
    in memory and streamed alike: they are left out, counted per feature set, and said in one DataWarning line.
    `finite`: per named set, (n_rows,) whether each of the same rows is finite. Returns ((n,) rows kept, {set: rows
    left out} for the sets that hold any)."""
    keep = np.ones(n_rows, dtype=bool)
    for mask in finite.values():
        keep &= mask
    non_finite = {name: int((~mask).sum()) for name, mask in finite.items() if not mask.all()}
    if non_finite:
        sets = ", ".join(f"feature set {name} has {n} row{'s' if n != 1 else ''}" for name, n in non_finite.items())
        warnings.warn(f"{path}: {sets} marked ok that hold NaN or inf; {int((~keep).sum())} rows left out (extract "
                      "into a new --store to recompute them)", DataWarning, stacklevel=3)
    return keep, non_finite


def _finite_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """(n,) whether dataset[rows] (increasing rows) is finite, read one row block at a time."""
    finite = np.ones(len(rows), dtype=bool)
    block = block_rows(dataset)
    starts = np.searchsorted(rows, np.arange(0, dataset.shape[0] + block, block))
    for first, stop in zip(starts[:-1], starts[1:]):
        if stop > first:
            lo, hi = int(rows[first]), int(rows[stop - 1]) + 1
            finite[first:stop] = np.isfinite(dataset[lo:hi][rows[first:stop] - lo]).all(axis=1)
    return finite
