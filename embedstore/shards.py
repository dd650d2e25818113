"""Sharded extraction (`embed extract --shard k/n`, one process per GPU under torchrun) and `embed merge`.

A shard is a store of the usual layout holding one contiguous range of the manifest's rows; its root attributes
(store.SHARD_KEYS) say which. Its features record the whole manifest's sha256, since they describe that
manifest's items. Merging checks that the shards fit together and writes a store whose feature and status
datasets are HDF5 virtual datasets mapping onto the shard files by relative name: nothing is copied but the
small item tables, and the folder can move as a whole, but the shard files must stay beside the merged store.
"""
from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from embedstore.manifest import Manifest
from embedstore.outputs import partial_file
from embedstore.store import IDENTITY_KEYS, SHARD_KEYS, STATUS_NAMES, STATUS_PENDING, FeatureSetInfo, FeatureStore, now_iso
from embedstore.store_writer import describe_rows


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    def rows(self, n_items: int) -> range:
        """Contiguous rows, as even as possible: the first n_items % count shards hold one row more."""
        size, extra = divmod(n_items, self.count)
        start = self.index * size + min(self.index, extra)
        return range(start, start + size + (self.index < extra))

    def attrs(self, n_items: int) -> dict[str, int]:
        rows = self.rows(n_items)
        values = (self.index, self.count, rows.start, rows.stop, n_items)
        return dict(zip(SHARD_KEYS, values))

    def path_for(self, store: str | Path) -> Path:
        """`store.h5` -> `store.shard-0-of-2.h5` (a path already naming this shard is kept)."""
        store, tag = Path(store), f".shard-{self.index}-of-{self.count}"
        if store.stem.endswith(tag):
            return store
        return store.with_name(f"{store.stem}{tag}{store.suffix or '.h5'}")


def parse_shard(text: str | None, environ: Mapping[str, str] = os.environ) -> Shard | None:
    """`--shard`: "k/n", "auto" (RANK / WORLD_SIZE as torchrun sets them), "none", or None: auto when torchrun
    started more than one process, else the whole store. ValueError (one line) for anything else."""
    if text is None:
        if "RANK" in environ and "WORLD_SIZE" in environ and _env_int(environ, "WORLD_SIZE") > 1:
            text = "auto"
        else:
            return None
    text = text.strip().lower()
    if text == "none":
        return None
    if text == "auto":
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            raise ValueError("--shard auto takes RANK and WORLD_SIZE from the environment (torchrun sets them) "
                             "and they are not set: run under torchrun or pass --shard k/n")
        index, count = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    elif match := re.fullmatch(r"(\d+)\s*/\s*(\d+)", text):
        index, count = int(match[1]), int(match[2])
    else:
        raise ValueError(f"--shard {text!r} is not k/n, auto or none: pass e.g. --shard 0/4 for the first of 4 shards")
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {index}/{count}: k is 0-based and must be below n (0..{count - 1} of {count}), "
                         "e.g. --shard 0/4 .. --shard 3/4")
    return Shard(index, count)


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"the environment variable {name}={environ[name]!r} is not an integer") from None


# ----------------------------------------------------------------------------------------------- extracting


@dataclass
class ManifestRows(Manifest):
    """One shard's rows of a manifest, for extraction. It keeps the whole manifest's sha256: that is what its
    features describe, what resuming checks, and what the merge matches shards by."""

    whole_sha256: str = ""

    @property
    def sha256(self) -> str:
        return self.whole_sha256


def shard_job(manifest: Manifest, store: str | Path, shard: Shard) -> tuple[ManifestRows, Path, dict]:
    """(the shard's rows of the manifest, the shard's store file, its root attributes)."""
    n_items = len(manifest.items)
    if shard.count > n_items:
        raise ValueError(f"--shard {shard.index}/{shard.count}: {shard.count} shards of {n_items} items would leave "
                         f"some empty; use at most {n_items} shards")
    rows = shard.rows(n_items)
    parts = {f.name: getattr(manifest, f.name) for f in fields(manifest)}
    view = ManifestRows(**{**parts, "items": manifest.items[rows.start : rows.stop]}, whole_sha256=manifest.sha256)
    return view, shard.path_for(store), shard.attrs(n_items)


# ----------------------------------------------------------------------------------------------- merging


@dataclass
class _ShardFile:
    path: Path
    attrs: dict  # SHARD_KEYS -> int
    manifest_sha256: str
    sets: dict[str, FeatureSetInfo]

    @property
    def start(self) -> int:
        return self.attrs["shard_row_start"]

    @property
    def stop(self) -> int:
        return self.attrs["shard_row_stop"]

    def __str__(self) -> str:
        return f"{self.path.name} ({describe_rows(self.attrs)})"


def merge_shards(paths: Iterable[str | Path], out: str | Path) -> Path:
    """Check that the shards fit together and write `out`, a store reading their rows through virtual datasets."""
    paths, out = [Path(p) for p in paths], Path(out)
    if not out.parent.is_dir():  # a merged store reads its shards by relative name: it belongs in an existing folder
        raise FileNotFoundError(errno.ENOENT, "the folder of --out does not exist (create it, or merge beside the "
                                "shards)", str(out.parent))
    if not paths:
        raise ValueError("no shard files given: pass every STORE.shard-k-of-n.h5 of one extraction")
    if len({p.resolve() for p in paths}) < len(paths):
        raise ValueError("a shard file is named twice; pass each shard once")
    shards = sorted((_read_shard(p) for p in paths), key=lambda s: s.start)
    _check_same_manifest(shards)
    _check_coverage(shards)
    _check_same_feature_sets(shards)
    _check_complete(shards)
    _refuse_overwriting(out, paths)
    # written beside `out` (same folder, so the relative source names hold for `out` too) and renamed whole
    with partial_file(out) as partial:
        try:
            _write_merged(shards, partial, out)
        except OSError as error:  # h5py's message (a full disk) names no file
            if error.filename is not None:
                raise
            raise OSError(error.errno or errno.EIO, f"cannot write the merged store ({str(error).splitlines()[0]})",
                          str(out)) from None
    return out


def _read_shard(path: Path) -> _ShardFile:
    with FeatureStore(path) as store:
        if not all(key in store.attrs for key in SHARD_KEYS):
            raise ValueError(f"{path} is not a shard (it holds every manifest item); only files written by "
                             "`embed extract --shard k/n` are merged")
        attrs = {key: int(store.attrs[key]) for key in SHARD_KEYS}
        if len(store.ids) != attrs["shard_row_stop"] - attrs["shard_row_start"]:
            raise ValueError(f"{path}: its item table holds {len(store.ids)} rows but its attributes say "
                             f"{describe_rows(attrs)}; extract this shard again")
        return _ShardFile(path, attrs, store.manifest_sha256, store.feature_sets)


def _check_same_manifest(shards: list[_ShardFile]) -> None:
    first = shards[0]
    for shard in shards[1:]:
        if shard.manifest_sha256 != first.manifest_sha256 or shard.attrs["total_items"] != first.attrs["total_items"]:
            raise ValueError(f"shard {shard} belongs to another manifest (sha256 {shard.manifest_sha256[:12]}…) than "
                             f"{first} ({first.manifest_sha256[:12]}…); merge the shards of one manifest")


def _check_coverage(shards: list[_ShardFile]) -> None:
    """Sorted by start, each shard must begin where the previous one ended, from row 0 to row N."""
    n_items, covered, previous = shards[0].attrs["total_items"], 0, None
    for shard in shards + [None]:
        start = n_items if shard is None else shard.start
        if start > covered:
            raise ValueError(f"rows {covered}..{start - 1} of {n_items} are in no shard given "
                             f"({_missing_shards(shards, covered, start)}); extract them with "
                             "`embed extract MANIFEST --store STORE --shard k/n` and pass every shard")
        if start < covered:
            raise ValueError(f"shards {previous} and {shard} overlap; pass the shards of one --shard k/n split")
        if shard is not None:
            covered, previous = shard.stop, shard


def _missing_shards(shards: list[_ShardFile], start: int, stop: int) -> str:
    counts = {s.attrs["shard_count"] for s in shards}
    if len(counts) != 1:
        return "the shards given come from different splits"
    count, n_items = counts.pop(), shards[0].attrs["total_items"]
    missing = [k for k in range(count) if Shard(k, count).rows(n_items).start in range(start, stop)]
    return "missing: " + ", ".join(f"shard {k} of {count}" for k in missing)


def _check_same_feature_sets(shards: list[_ShardFile]) -> None:
    first = shards[0]
    if not first.sets:
        raise ValueError(f"shard {first} holds no feature sets yet; run `embed extract` on every shard first")
    for shard in shards[1:]:
        if set(shard.sets) != set(first.sets):
            raise ValueError(f"shard {shard} holds feature sets {sorted(shard.sets)} but {first} holds "
                             f"{sorted(first.sets)}; extract the same backbones into every shard")
        for name, info in shard.sets.items():
            for key in IDENTITY_KEYS:
                if info.provenance.get(key) != first.sets[name].provenance.get(key):
                    raise ValueError(f"{name} in shard {shard} has another {key} ({info.provenance.get(key)!r}) than "
                                     f"in {first} ({first.sets[name].provenance.get(key)!r}); re-extract the shards "
                                     "with the same backbone, weights and settings")


def _check_complete(shards: list[_ShardFile]) -> None:
    for shard in shards:
        for name, info in shard.sets.items():
            if not info.complete:
                k, n = shard.attrs["shard_index"], shard.attrs["shard_count"]
                raise ValueError(f"{name} in shard {shard} is incomplete ({info.counts.get('pending', '?')} rows "
                                 f"pending); finish it with `embed extract MANIFEST --store STORE --shard {k}/{n}` "
                                 "(it resumes)")


def _refuse_overwriting(out: Path, shards: list[Path]) -> None:
    """Replacing an earlier merge is fine (it holds no data of its own); replacing anything else is not."""
    if not out.exists():
        return
    if out.resolve() in {p.resolve() for p in shards}:
        raise ValueError(f"--out {out} is one of the shards; name a new file for the merged store")
    with h5py.File(out, "r", locking=False) as f:
        merged = "merged_from" in f.attrs
    if not merged:
        raise ValueError(f"--out {out} exists and is not a merged store; remove it or choose another --out")


# ----------------------------------------------------------------------------------------------- writing


def _write_merged(shards: list[_ShardFile], partial: Path, out: Path) -> None:
    """The merged store `out`, written to `partial` (a temporary file in its folder)."""
    names = [os.path.relpath(s.path.resolve(), out.resolve().parent) for s in shards]  # relative: the folder may move
    with h5py.File(partial, "w", locking=False) as f:
        _copy_tables(shards, f, names)
        with h5py.File(shards[0].path, "r", locking=False) as first:
            for modality, sources in first["features"].items():
                for source, group in sources.items():
                    _write_virtual_group(shards, names, f, group)


def _copy_tables(shards: list[_ShardFile], f: h5py.File, names: list[str]) -> None:
    """Root attributes and the small item tables (variable-length strings do not map into virtual datasets)."""
    with h5py.File(shards[0].path, "r", locking=False) as first:
        f.attrs.update({key: value for key, value in first.attrs.items() if key not in SHARD_KEYS})
        f.create_dataset("classes", data=first["classes"][:], dtype=first["classes"].dtype)
        dtypes = {column: first[f"items/{column}"].dtype for column in ("id", "label", "split")}
    columns = {column: [] for column in dtypes}
    for shard in shards:
        with h5py.File(shard.path, "r", locking=False) as source:
            for column, values in columns.items():
                values.append(source[f"items/{column}"][:])
    items = f.create_group("items")
    for column, values in columns.items():
        items.create_dataset(column, data=np.concatenate(values), dtype=dtypes[column])
    f.attrs.update({"created": now_iso(), "merged_from": json.dumps(names)})


def _write_virtual_group(shards: list[_ShardFile], names: list[str], f: h5py.File, group: h5py.Group) -> None:
    """features/<modality>/<source>: every layer and the status as (N, ...) virtual datasets over the shards."""
    n_items = shards[0].attrs["total_items"]
    target = f.require_group(group.name)
    for layer, dataset in group.items():
        layout = h5py.VirtualLayout(shape=(n_items, *dataset.shape[1:]), dtype=dataset.dtype)
        for shard, name in zip(shards, names):
            shape = (shard.stop - shard.start, *dataset.shape[1:])
            layout[shard.start : shard.stop] = h5py.VirtualSource(name, dataset.name, shape=shape)
        # the fill is what a reader would see of an unreachable shard: NaN features, pending status
        fill = STATUS_PENDING if layer == "status" else np.nan
        merged = target.create_virtual_dataset(layer, layout, fillvalue=fill)
        merged.attrs.update(dict(dataset.attrs))  # provenance: identical identity keys in every shard (checked)
    prefix = group.name.removeprefix("/features/") + "/"  # "<modality>/<source>/"; its layers share one status
    counts = {name: 0 for name in STATUS_NAMES.values()}
    for shard in shards:
        shard_counts = next(info.counts for name, info in shard.sets.items() if name.startswith(prefix))
        for name, value in shard_counts.items():
            counts[name] = counts.get(name, 0) + int(value)
    target.attrs.update({"counts": json.dumps(counts, sort_keys=True), "complete": True})
