"""`heads ensemble`: the average of the class probabilities of the top-k saved heads, ranked by validation.

    from heads.ensemble import ensemble
    row = ensemble(["results/pooled", "results/modules-seed-0"], top_k="auto")

Members are the saved model folders under each RESULTS/heads/ (heads/<cell>/ or heads/<pair>/<cell>/), ranked by
the validation accuracy recorded when they were saved (never by test). Each folder names its store relative to
itself and the feature sets it reads. The stores may be separate copies of one manifest (the paper keeps its
2-A/2-B and 1-A/1-B heads in different results folders), so members are aligned by item id over the items that
every member scores; the items of each split left out are counted in the row. top_k="auto" picks k in 1..N by
the ensemble's validation accuracy (ties: the smaller k).

One row per pool and request goes to FIRST_RESULTS/ensembles.jsonl (the results folder's lock, atomic appends);
a rerun over the same members and stores finds its row and skips.

Member kinds: MEMBER_LOADERS maps a model folder's kind (embedstore.model_folder.read_config) to a loader that
returns a Member; another kind that offers predict_proba over feature arrays is one loader and one entry here.
Folders of other kinds, unreadable folders, members whose store is gone and members whose probabilities are not
finite on a whole split are skipped and counted; items a member scores non-finite are left out like items another
member does not score. A results folder named twice (by its resolved path) counts once, and results of different
manifests (as their models record) are refused in one line: an ensemble is of one manifest's models.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from embedstore.fingerprint import fingerprint
from embedstore.metrics import classification_metrics
from heads.cv_select import VALIDATION, cross_validate, format_selection, parse_select
from heads.joined import joins_in, open_store
from heads.selection import best_by_validation, rank_by_validation
from heads.strategies import is_multimodal
from embedstore.model_folder import CONFIG_FILE, read_config
from embedstore.outputs import relative_to_folder
from heads.results import ResultsLock, append_rows, read_runs

ENSEMBLES_FILE = "ensembles.jsonl"
SPLITS = ("val", "test")


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


def collect_members(results_dirs: list[Path], *, multimodal_only: bool = False,
                    base: Path | None = None) -> tuple[list[Member], list[str], int]:
    """(members ranked by recorded validation accuracy, notes on the folders skipped, how many unimodal
    members --multimodal-only left out). Paths in notes are relative to `base`. Members recorded as trained on
    different manifests are refused in one line naming both (see _same_manifest)."""
    base = base or results_dirs[0]
    members, notes, unimodal = [], [], 0
    first_of_manifest: tuple[str, Path, Path] | None = None   # (manifest, results folder, member folder)
    for results in results_dirs:
        for folder in find_model_folders(results):
            name = relative_to_folder(folder, base)
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
    # heads/selection.py's rule (ties: folder name), so the ranking does not depend on the order the folders were listed in
    members = rank_by_validation(members, val=lambda m: m.val_accuracy, name=lambda m: relative_to_folder(m.folder, base))
    return members, notes, unimodal


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


@dataclass
class _Scores:
    """A member's probabilities on one split, in its store's row order."""
    ids: np.ndarray        # (n,) item ids
    labels: np.ndarray     # (n,) class names
    proba: np.ndarray      # (n, C) in the member's class order


def _score(member: Member, store, loaded: dict) -> tuple[dict[str, _Scores], dict[str, int]]:
    """(The member's probabilities per split, the items per split left out for non-finite probabilities);
    `loaded` keeps each (store, feature sets) read once, since most members of a pool read the same pooled sets
    of the same store. A member whose probabilities are not finite on any item of a split (NaN weights, say) is
    a ValueError: left as they were, every argmax would be class 0 and the ensemble fall to chance silently.
    Items it scores non-finite among finite ones (an overflowing feature row) are left out like items another
    member does not score."""
    key = (store.path, member.inputs)
    if key not in loaded:
        loaded[key] = store.load(list(member.inputs))
    data = loaded[key]
    classes = np.asarray(store.classes)
    scores, left_out = {}, {}
    for split in SPLITS:
        rows = data.split == split
        proba = np.asarray(member.predict_proba([data.features[n][rows] for n in member.inputs]), dtype=np.float64)
        finite = np.isfinite(proba).all(axis=1)  # (n,)
        if len(finite) and not finite.any():
            raise ValueError(f"its probabilities are not finite (NaN or inf) on all {len(finite)} {split} items; "
                             "train or save it again")
        left_out[split] = int((~finite).sum())
        scores[split] = _Scores(data.ids[rows][finite], classes[data.labels[rows]][finite], proba[finite])
    return scores, left_out


def _align(chosen: list[tuple[Member, dict[str, _Scores]]], split: str,
           classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(ids, label indices, [(n, C) per member]) over the items of `split` that every member scores, columns
    in `classes` order."""
    common = set.intersection(*(set(s[split].ids.tolist()) for _, s in chosen))
    if not common:
        raise ValueError(f"the {len(chosen)} members share no {split} item (aligned by item id); check that their "
                         "stores hold features of one manifest's items")
    ids = np.array(sorted(common), dtype=object)
    labels, probas = None, []
    for member, scores in chosen:
        row_of = {item: i for i, item in enumerate(scores[split].ids.tolist())}
        rows = np.array([row_of[item] for item in ids], dtype=np.int64)
        mine = scores[split].labels[rows]
        if labels is None:
            labels = mine
        elif not np.array_equal(labels, mine):
            item = ids[np.flatnonzero(labels != mine)[0]]
            raise ValueError(f"item {item} has another label in the store of {member.folder}; the stores are not "
                             "copies of one manifest")
        columns = [member.classes.index(c) for c in classes]
        probas.append(scores[split].proba[rows][:, columns])  # (n, C)
    index = {c: i for i, c in enumerate(classes)}
    return ids, np.array([index[c] for c in labels], dtype=np.int64), probas


def parse_top_k(top_k) -> int | str:
    if isinstance(top_k, str) and top_k.strip().lower() == "auto":
        return "auto"
    try:
        k = int(top_k)
    except (TypeError, ValueError):
        raise ValueError(f"top-k must be a positive integer or 'auto', got {top_k!r}") from None
    if k < 1 or str(k) != str(top_k).strip():
        raise ValueError(f"top-k must be a positive integer or 'auto', got {top_k!r}")
    return k


def ensemble(results_dirs: str | os.PathLike | Iterable[str | os.PathLike], top_k: int | str = "auto", *,
             multimodal_only: bool = False, select: str = VALIDATION, log: Callable[[str], None] = print) -> dict:
    """Average the class probabilities of the top-k saved heads (by recorded validation accuracy) of the
    results folders, score the average on validation and test, and record it in the first folder's
    ensembles.jsonl. Returns the row (`already_recorded` True when an identical run was found and skipped)."""
    if isinstance(results_dirs, (str, os.PathLike)):
        results_dirs = [results_dirs]
    results_dirs = [Path(r) for r in results_dirs]
    if not results_dirs:
        raise ValueError("name at least one results folder")
    results_dirs = distinct_folders(results_dirs, log)
    request, selection = parse_top_k(top_k), parse_select(select)   # cv:K: heads/cv_select.py
    for results in results_dirs:  # before the lock, which would create the folder
        find_model_folders(results)
    base = results_dirs[0]
    t_start = time.perf_counter()
    with ResultsLock(base, command="heads ensemble",
                     advice="wait for it to finish (the ensemble's row goes to the first RESULTS folder named)"):
        members, notes, unimodal = collect_members(results_dirs, multimodal_only=multimodal_only, base=base)
        for note in notes:
            log(note)
        key = fingerprint({"top_k": request, "multimodal_only": multimodal_only,
                           "pool": [(relative_to_folder(m.folder, base), m.identity,
                                     relative_to_folder(m.store_path, base)) for m in members],
                           **({"select": selection.label} if selection.how != VALIDATION else {})})
        for row in read_runs(base, ENSEMBLES_FILE):
            if row["run_key"] == key:
                log(f"this ensemble (same members and stores) is already in {base / ENSEMBLES_FILE}; skipped")
                return {**row, "already_recorded": True}
        cv, started = None, time.perf_counter()
        if selection.how != VALIDATION and members:   # rank the members (and choose k) by K-fold CV instead
            cv = cross_validate(members, selection, log=log)
            members = rank_by_validation(members, val=lambda m: cv.accuracy([m.folder]),
                                         name=lambda m: relative_to_folder(m.folder, base))
        row = _evaluate(members, notes, request, base, log, cv)
        row.update({"select": selection.label, "selection_seconds": time.perf_counter() - started if cv else 0.0})
        row.update({"run_key": key, "cell": "ensemble", "strategy": "ensemble", "fusion": None, "top_k": request,
                    "multimodal_only": multimodal_only, "unimodal_left_out": unimodal,
                    "results_dirs": [relative_to_folder(r, base) for r in results_dirs],
                    "seconds": time.perf_counter() - t_start, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        append_rows(base, [row], ENSEMBLES_FILE)
    return {**row, "already_recorded": False}


def _evaluate(members: list[Member], notes: list[str], request: int | str, base: Path, log, cv=None) -> dict:
    with contextlib.ExitStack() as stack:
        stores: dict[Path, object] = {}
        loaded: dict = {}   # (store, feature sets) -> its data, read once for every member that reads it
        scored, manifest, reference = [], None, None
        non_finite: dict[str, dict[str, int]] = {}  # member -> split -> items it scored non-finite (left out)
        for member in members:
            name = relative_to_folder(member.folder, base)
            path = member.store_path.resolve()
            try:
                if path not in stores:   # with the joined sources (heads/joined.py) its pool reads there
                    stores[path] = stack.enter_context(open_store(path, _joins(members, path)))
                store = stores[path]
                if manifest is not None and store.manifest_sha256 != manifest:
                    raise ValueError(f"its store is of manifest {store.manifest_sha256[:12]}, not "
                                     f"{manifest[:12]} like the best member's")
                if reference is not None and set(member.classes) != set(reference.classes):
                    raise ValueError("its classes differ from the best member's")
                scores, left_out = _score(member, store, loaded)
            except (ValueError, KeyError, OSError) as error:
                reason = str(error.args[0] if error.args else error).splitlines()[0]
                notes.append(f"{name}: skipped ({reason})")
                log(notes[-1])
                continue
            if any(left_out.values()):
                non_finite[name] = left_out
                log(f"{name}: {left_out['val']} validation and {left_out['test']} test item(s) with non-finite "
                    "probabilities left out of the ensemble")
            if reference is None:  # every manifest item of a split, ok or not: what "left out" counts from
                manifest, reference = store.manifest_sha256, member
                split_sizes = {s: int((store.split == s).sum()) for s in SPLITS}
            scored.append((member, scores))
        if not scored:
            raise ValueError(f"no saved head in {base} (or the other folders) can join an ensemble"
                             + (f": {len(notes)} skipped, first {notes[0]}" if notes else ""))
        n = len(scored)
        if request != "auto" and request > n:
            raise ValueError(f"--top-k {request}, but only {n} saved head(s) can join; use at most {n}, or auto")
        chosen = scored[:n if request == "auto" else request]
        classes = reference.classes
        aligned = {s: _align(chosen, s, classes) for s in SPLITS}
        by_k = []
        for k in range(1, len(chosen) + 1):
            entry = {"k": k, **({"cv_accuracy": cv.accuracy([m.folder for m, _ in chosen[:k]])} if cv else {})}
            for split in SPLITS:
                _, labels, probas = aligned[split]
                mean = np.mean(probas[:k], axis=0)  # (n, C): the ensemble's probabilities
                metrics = classification_metrics(labels, mean.argmax(axis=1), n_classes=len(classes))
                entry.update({f"{split}_accuracy": metrics["accuracy"], f"{split}_macro_f1": metrics["macro_f1"]})
            by_k.append(entry)
        # auto: the best validation accuracy, the smaller k on ties
        score = "cv_accuracy" if cv else "val_accuracy"
        best = best_by_validation(by_k, val=lambda e: e[score], name=lambda e: e["k"]) \
            if request == "auto" else by_k[-1]
        k = best["k"]
    return {"k": k, "pool": n, "members": [relative_to_folder(m.folder, base) for m, _ in chosen[:k]],
            "member_kinds": [m.kind for m, _ in chosen[:k]],
            "member_val_accuracy": [m.val_accuracy for m, _ in chosen[:k]],
            **({"member_cv_accuracy": [cv.accuracy([m.folder]) for m, _ in chosen[:k]],
                "cv_accuracy": best["cv_accuracy"]} if cv else {}),
            "val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"],
            "test_accuracy": best["test_accuracy"], "test_macro_f1": best["test_macro_f1"], "by_k": by_k,
            "best_single": {"member": relative_to_folder(chosen[0][0].folder, base), **by_k[0]},
            "items": {s: {"scored": len(aligned[s][0]), "left_out": split_sizes[s] - len(aligned[s][0])}
                      for s in SPLITS},
            "manifest_sha256": manifest,
            "stores": sorted({relative_to_folder(m.store_path, base) for m, _ in chosen[:k]}),
            "skipped_folders": len(notes), "notes": list(notes),
            **({"non_finite_left_out": non_finite} if non_finite else {})}


def _joins(members: list[Member], path: Path) -> dict[str, tuple[str, ...]]:
    """{modality: joined sources} that the members trained on the store at `path` read."""
    return joins_in(name for m in members if m.store_path.resolve() == path for name in m.inputs)


def format_summary(row: dict) -> str:
    """One paragraph: the members, the chosen k, the accuracies, the items left out and the folders skipped."""
    items, single = row["items"], row["best_single"]
    by = "validation" if row.get("select", VALIDATION) == VALIDATION else row["select"]
    how = f"k chosen by {by} accuracy" if row["top_k"] == "auto" else f"k = {row['top_k']} as asked"
    ranked = "recorded validation" if by == VALIDATION else by
    text = (f"Ensemble of the top {row['k']} of {row['pool']} saved heads by {ranked} accuracy ({how}"
            f"{', multimodal only' if row['multimodal_only'] else ''}): {', '.join(row['members'])}. "
            f"Validation accuracy {100 * row['val_accuracy']:.2f} %, test accuracy {100 * row['test_accuracy']:.2f} "
            f"%, test macro-F1 {100 * row['test_macro_f1']:.2f} %, over {items['val']['scored']:,} validation and "
            f"{items['test']['scored']:,} test items scored by every member ({items['val']['left_out']:,} and "
            f"{items['test']['left_out']:,} left out). The best single head by validation, {single['member']}: "
            f"validation {100 * single['val_accuracy']:.2f} %, test {100 * single['test_accuracy']:.2f} % on the "
            f"same items.") + format_selection(row)
    if row.get("skipped_folders"):
        text += f" {row['skipped_folders']} folder(s) skipped (listed in the row's notes)."
    if row.get("unimodal_left_out"):
        text += f" {row['unimodal_left_out']} unimodal head(s) left out by --multimodal-only."
    return text
