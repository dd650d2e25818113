"""Joined sources: several backbones' feature sets of one modality and layer read as one, side by side.

    heads sweep STORE --out RESULTS --image-source efficientnet_lite0,efficientnet_lite2

A source name holding JOIN (",") names a joined source: its members are the store's sources of that modality,
in that order (a comma never occurs in a source the store writes; "+" already joins a pair's image and text
sources in cell names, so it cannot). `JoinedStore` is the store as the sweep and the ensemble read it: every
real feature set, plus `<modality>/<a>,<b>/<layer>` for each joined source asked for and each layer all its
members hold. Its rows are the store's rows (every feature set of a store holds every manifest item in manifest
order), its status a row's first problem in member order (ok only where every member is ok), its values the
members' columns concatenated in member order (streamed heads read them block by block like any set), its
provenance {"joined": [each member's provenance, with "source"], "layer", "dtype", ...}: a run key made of it
changes when any member changes, and `heads predict` rebuilds every member from it (pipelines/predict_joined.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from embedstore.chunks import block_rows
from embedstore.store import STATUS_NAMES, STATUS_OK, FeatureSetInfo, FeatureStore, feature_set_name
from heads.rows import provenance as provenance_of   # as rows and run keys record it

JOIN = ","


def members_of(source: str) -> tuple[str, ...] | None:
    """The members of a joined source name ("a,b" -> ("a", "b")), or None for a plain source."""
    if JOIN not in source:
        return None
    parts = tuple(part.strip() for part in source.split(JOIN))
    if any(not p for p in parts):
        raise ValueError(f"joined source {source!r} has an empty member; name two or more sources joined by "
                         f"{JOIN!r}, e.g. efficientnet_lite0{JOIN}efficientnet_lite2")
    if len(set(parts)) != len(parts):
        raise ValueError(f"joined source {source!r} names a member twice; name each source once")
    return parts


def joined_name(members: Iterable[str]) -> str:
    return JOIN.join(members)


def joins_in(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{modality: joined sources} named by feature set names ("image/a,b/pooled"): what a saved model reads."""
    found: dict[str, list[str]] = {}
    for name in names:
        modality, source, _ = name.split("/")
        if members_of(source) and source not in found.setdefault(modality, []):
            found[modality].append(source)
    return {m: tuple(s) for m, s in found.items()}


class JoinedDataset:
    """The h5py-like view of a joined set that readers use: .shape, .dtype, .chunks, and row slices, whose rows
    are the members' rows side by side (as wide as the members together)."""

    def __init__(self, datasets: list):
        self.datasets = datasets
        self.dtype = np.result_type(*(d.dtype for d in datasets))
        self.shape = (int(datasets[0].shape[0]), sum(int(d.shape[1]) for d in datasets))
        # the widest member block: chunk rows are powers of two, so every member's chunks end on its boundaries
        self.chunks = (max(block_rows(d) for d in datasets), self.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        return np.concatenate([np.asarray(d[key], dtype=self.dtype) for d in self.datasets], axis=1)

    def __len__(self) -> int:
        return self.shape[0]


class JoinedStore(FeatureStore):
    """A FeatureStore that also holds the joined sources asked for: {modality: ("a,b", ...)}. Every check is a
    one-line ValueError: an unknown member, members of different modalities, members whose layers differ."""

    def __init__(self, path: str | Path, joins: dict[str, Iterable[str]] | None = None, **kwargs):
        super().__init__(path, **kwargs)
        self._joined: dict[str, tuple[FeatureSetInfo, list[str]]] = {}   # name -> (info, member set names)
        try:
            base = super().feature_sets
            for modality, sources in (joins or {}).items():
                for source in sources:
                    for info, members in _joined_sets(self, base, modality, source):
                        self._joined[info.name] = (info, members)
        except ValueError:
            self.close()
            raise

    @property
    def feature_sets(self) -> dict[str, FeatureSetInfo]:
        return {**super().feature_sets, **{name: info for name, (info, _) in self._joined.items()}}

    def members(self, name: str) -> list[str] | None:
        """The member set names of a joined set, or None for a plain one."""
        return self._joined[name][1] if name in self._joined else None

    def status(self, name: str) -> np.ndarray:
        if name not in self._joined:
            return super().status(name)
        return _first_problem([super(JoinedStore, self).status(m) for m in self._joined[name][1]])

    def dataset(self, name: str):
        if name not in self._joined:
            return super().dataset(name)
        return JoinedDataset([super(JoinedStore, self).dataset(m) for m in self._joined[name][1]])

    def non_finite_rows(self, name: str, chunk: int = 8192) -> int:
        if name not in self._joined:
            return super().non_finite_rows(name, chunk)
        ok, dataset, bad = self.status(name) == STATUS_OK, self.dataset(name), 0
        for begin in range(0, len(ok), chunk):
            bad += int((ok[begin:begin + chunk] & ~np.isfinite(dataset[begin:begin + chunk]).all(axis=1)).sum())
        return bad


def open_store(path: str | Path, joins: dict[str, Iterable[str]] | None = None) -> FeatureStore:
    """The store, with the joined sources among `joins` ({modality: source names}; plain names are ignored)."""
    wanted = {m: tuple(s for s in sources if members_of(s)) for m, sources in (joins or {}).items()}
    wanted = {m: s for m, s in wanted.items() if s}
    return JoinedStore(path, wanted) if wanted else FeatureStore(path)


def _first_problem(statuses: list[np.ndarray]) -> np.ndarray:
    """A row is ok where every member is; otherwise its status is the first member's problem."""
    out = np.full_like(statuses[0], STATUS_OK)
    for status in reversed(statuses):
        out = np.where(status != STATUS_OK, status, out)
    return out


def _joined_sets(store: FeatureStore, base: dict[str, FeatureSetInfo], modality: str, source: str
                 ) -> list[tuple[FeatureSetInfo, list[str]]]:
    """The joined source's sets, one per layer every member holds; one-line ValueErrors otherwise."""
    members = members_of(source)
    layers: dict[str, set[str]] = {}
    for member in members:
        own = {i.layer for i in base.values() if i.source == member and i.modality == modality}
        if not own:
            elsewhere = sorted({i.modality for i in base.values() if i.source == member})
            held = sorted({i.source for i in base.values() if i.modality == modality})
            raise ValueError(
                f"joined {modality} source {source}: {member} is a {elsewhere[0]} source, not one of the {modality} "
                "sources; join sources of one modality" if elsewhere else
                f"joined {modality} source {source}: {store.path} holds no {modality} source {member!r} (its "
                f"{modality} sources: {', '.join(held) or 'none'})")
        layers[member] = own
    first = members[0]
    for member in members[1:]:
        if layers[member] != layers[first]:
            if not layers[member] & layers[first]:
                raise ValueError(f"joined {modality} source {source}: {first} holds {', '.join(sorted(layers[first]))}"
                                 f" features and {member} {', '.join(sorted(layers[member]))}; join sources of the "
                                 "same layer (backbones' 'pooled', or modules' 'dense' / 'classifier')")
            lacking, holder = ((member, first) if layers[first] - layers[member] else (first, member))
            layer = sorted(layers[holder] - layers[lacking])[0]
            raise ValueError(f"joined {modality} source {source}: {lacking} has no '{layer}' layer, which {holder} "
                             "has; join sources that hold the same layers")
    found = []
    for layer in sorted(layers[first]):
        names = [feature_set_name(modality, m, layer) for m in members]
        infos = [base[n] for n in names]
        dims = [i.dim for i in infos]
        dtype = str(np.result_type(*(i.dtype for i in infos)))
        provenance = {"joined": [{"source": i.source, **provenance_of(i)} for i in infos],
                      "layer": layer, "dtype": dtype, "dims": dims, "complete": all(i.complete for i in infos)}
        if all("parameters" in i.provenance for i in infos):
            provenance["parameters"] = sum(int(i.provenance["parameters"]) for i in infos)
        status = _first_problem([store.status(n) for n in names])
        counts = {STATUS_NAMES[code]: int((status == code).sum()) for code in STATUS_NAMES}
        name = feature_set_name(modality, source, layer)
        found.append((FeatureSetInfo(name=name, modality=modality, source=source, layer=layer, dim=sum(dims),
                                     dtype=dtype, provenance=provenance, complete=provenance["complete"],
                                     counts=counts), names))
    return found
