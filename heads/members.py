"""The saved models of `heads sweep` results folders as candidates of `heads ensemble` and `heads select`: one
Member per saved model folder (RESULTS/heads/<cell>/ or RESULTS/heads/<pair>/<cell>/), ranked by the validation
accuracy recorded when it was saved (never by test), optionally narrowed to the cells named by --only patterns.

Member kinds: MEMBER_LOADERS maps a model folder's kind (embedstore.model_folder.read_config) to a loader that
returns a Member; another kind that offers predict_proba over feature arrays is one loader and one entry here.
Folders of other kinds, unreadable folders, members whose store is gone and members whose probabilities are not
finite on a whole split are skipped and counted; items a member scores non-finite are left out like items another
member does not score. A results folder named twice (by its resolved path) counts once, and results of different
manifests (as their models record) are refused in one line: an ensemble is of one manifest's models.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np

from embedstore.fingerprint import fingerprint
from embedstore.model_folder import CONFIG_FILE, read_config
from embedstore.outputs import relative_to_folder
from heads.selection import rank_by_validation
from heads.strategies import is_multimodal


@dataclass
class Member:
    """One saved model that can join an ensemble."""
    folder: Path
    kind: str
    val_accuracy: float              # recorded when it was saved: what ranks the members
    store_path: Path                 # the store it was trained on
    inputs: tuple[str, ...]          # the store's feature sets it reads, in the order predict_proba takes them
    classes: tuple[str, ...]         # predict_proba's columns
    multimodal: bool
    identity: str                    # changes when the folder is saved again (its run_key): part of the row's key
    predict_proba: Callable[[list[np.ndarray]], np.ndarray] = field(repr=False)  # [(n, D_m)] -> (n, C)
    manifest_sha256: str | None = None  # the manifest of the store it was trained on, as recorded when saved


def _member(folder: Path, config: dict, meta: dict, classes, multimodal: bool,
            predict_proba: Callable[[list[np.ndarray]], np.ndarray]) -> Member:
    """What every kind's folder must record to be a member (its validation accuracy, its store), checked once."""
    from heads.saved import head_store_path

    if not isinstance(meta.get("best_val_accuracy"), (int, float)):
        raise ValueError("no recorded validation accuracy (best_val_accuracy); save it with `heads sweep`")
    if not isinstance(meta.get("store"), dict) or "path" not in meta["store"]:
        raise ValueError("names no store (store.path); save it with `heads sweep`")
    inputs = meta.get("inputs") or list(meta["store"].get("feature_sets") or [])
    manifest = meta["store"].get("manifest_sha256")
    return Member(folder, config["kind"], float(meta["best_val_accuracy"]), head_store_path(folder, meta),
                  tuple(inputs), tuple(str(c) for c in classes), multimodal,
                  meta.get("run_key") or fingerprint(config), predict_proba,
                  manifest if isinstance(manifest, str) else None)


def _fusion_head(folder: Path, config: dict) -> Member:
    from heads.estimator import FusionHead

    head = FusionHead.from_pretrained(folder)
    return _member(folder, config, head.metadata_, head.classes_, is_multimodal(head.config_.strategy),
                   head.predict_proba)


def _decision_model(folder: Path, config: dict) -> Member:
    """LR-*, LF, ST, LFM (heads/decision.py): scikit-learn fits saved as arrays."""
    from heads.decision_model import DecisionModel

    model = DecisionModel.from_pretrained(folder)
    return _member(folder, config, model.metadata, model.classes, is_multimodal(model.strategy),
                   model.predict_proba)


# kind (config.json "kind") -> loader(folder, config) -> Member
MEMBER_LOADERS: dict[str, Callable[[Path, dict], Member]] = {"fusion-head": _fusion_head, "linear": _decision_model}


def load_member(folder: str | os.PathLike) -> Member:
    """A saved model folder as a Member; a one-line ValueError / OSError when it cannot be one."""
    folder = Path(folder)
    config = read_config(folder)
    loader = MEMBER_LOADERS.get(config["kind"])
    if loader is None:
        raise ValueError(f"a {config['kind']} model, which no ensemble loader takes "
                         f"(members: {', '.join(MEMBER_LOADERS)})")
    return loader(folder, config)


def find_model_folders(results_dir: str | os.PathLike) -> list[Path]:
    """RESULTS/heads/<cell>/ and RESULTS/heads/<pair>/<cell>/, sorted; folders that hold no config.json and no
    sub-folders are listed too, so that they are counted as skipped rather than passed over."""
    heads_dir = Path(results_dir) / "heads"
    if not heads_dir.is_dir():
        raise FileNotFoundError(f"no saved heads in {results_dir} (no {heads_dir}); run `heads sweep STORE --out "
                                f"{results_dir}` first")

    def subfolders(path: Path) -> list[Path]:  # ".<name>.writing-*": a save in progress, not a model
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))

    found = []
    for folder in subfolders(heads_dir):
        inner = subfolders(folder)
        found += inner if inner and not (folder / CONFIG_FILE).exists() else [folder]
    return found


class Pool(NamedTuple):
    members: list[Member]   # ranked by recorded validation accuracy
    notes: list[str]        # the folders skipped, and why (paths relative to the first results folder)
    unimodal: int           # unimodal members --multimodal-only left out
    not_named: int          # saved models --only left out


def parse_only(only: str | Iterable[str] | None) -> tuple[str, ...]:
    """--only: shell-style patterns (comma-separated in one string, or several), each matched against a saved
    model's cell folder name (`2A-concat`, `LF`) and its path relative to the first results folder
    (`heads/2A-*`, `../modules-seed-0/heads/1A-*`); () keeps every model."""
    if only is None:
        return ()
    parts = only.split(",") if isinstance(only, str) else [p for o in only for p in str(o).split(",")]
    patterns = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not patterns and (only if isinstance(only, str) else list(only)):
        raise ValueError(f"--only {only!r} names no pattern; give cell names or patterns, e.g. --only '2A-*,LF'")
    return patterns


def collect_members(results_dirs: list[Path], *, multimodal_only: bool = False, base: Path | None = None,
                    only: str | Iterable[str] | None = None) -> Pool:
    """The pool of saved models of the results folders: members ranked by recorded validation accuracy, and what
    was left out (see Pool). Members recorded as trained on different manifests are refused in one line naming
    both (see _same_manifest); --only patterns that match no saved model are refused in one line naming some."""
    base = base or results_dirs[0]
    patterns = parse_only(only)
    members, notes, unimodal, not_named, seen = [], [], 0, 0, []
    first_of_manifest: tuple[str, Path, Path] | None = None   # (manifest, results folder, member folder)
    for results in results_dirs:
        for folder in find_model_folders(results):
            name = relative_to_folder(folder, base)
            seen.append(folder.name)
            if patterns and not any(fnmatch.fnmatchcase(folder.name, p) or fnmatch.fnmatchcase(name, p)
                                    for p in patterns):
                not_named += 1
                continue
            try:
                member = load_member(folder)
            except (ValueError, KeyError, TypeError, OSError) as error:
                reason = str(error.args[0] if error.args else error).splitlines()[0] or type(error).__name__
                notes.append(f"{name}: skipped ({reason.replace(str(folder), name)})")
                continue
            if member.manifest_sha256 is not None:
                first_of_manifest = first_of_manifest or (member.manifest_sha256, results, folder)
                _same_manifest(first_of_manifest, (member.manifest_sha256, results, folder), base)
            if not member.store_path.is_file():
                notes.append(f"{name}: skipped (its store {relative_to_folder(member.store_path, base)} is gone)")
            elif multimodal_only and not member.multimodal:
                unimodal += 1
            else:
                members.append(member)
    if patterns and not_named == len(seen):
        cells = ", ".join(sorted(set(seen))[:12]) + (", ..." if len(set(seen)) > 12 else "")
        raise ValueError(f"--only {','.join(patterns)} matches none of the {len(seen)} saved models (cells: "
                         f"{cells or 'none'}); name cells or patterns of them, e.g. --only '2A-*,LF'")
    # heads/selection.py's rule (ties: folder name), so the ranking does not depend on the order the folders were listed in
    members = rank_by_validation(members, val=lambda m: m.val_accuracy, name=lambda m: relative_to_folder(m.folder, base))
    return Pool(members, notes, unimodal, not_named)


def _same_manifest(first: tuple[str, Path, Path], other: tuple[str, Path, Path], base: Path) -> None:
    """Refuse a pool of models trained on different manifests' items: they cannot be aligned item by item, and
    the row (written to the first folder) would describe one manifest's ensemble as if it were another's."""
    if first[0] == other[0]:
        return
    where = (f"{first[1]} and {other[1]} hold models of different manifests" if first[1] != other[1] else
             f"{first[1]} holds models of different manifests")
    raise ValueError(f"{where} ({first[0][:12]} in {relative_to_folder(first[2], base)}, {other[0][:12]} in "
                     f"{relative_to_folder(other[2], base)}); an ensemble averages models of one manifest: ensemble "
                     "each manifest's results folders on their own")


def distinct_folders(results_dirs: list[Path], log: Callable[[str], None]) -> list[Path]:
    """The results folders less the ones named again (the same folder by its resolved path: `R R ./R`), so no
    model counts twice in a pool; said in one line."""
    named: dict[Path, list[Path]] = {}
    for results in results_dirs:
        named.setdefault(results.resolve(), []).append(results)
    for names in named.values():
        if len(names) > 1:
            log(f"{names[0]} named {len(names)} times ({', '.join(map(str, names))}): its models count once")
    return [names[0] for names in named.values()]
