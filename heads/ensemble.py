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

Members (heads/members.py) are collected from the results folders; a member whose probabilities are not finite
on a whole split is skipped and counted, and items a member scores non-finite are left out like items another
member does not score.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from embedstore.fingerprint import fingerprint
from embedstore.metrics import classification_metrics
from heads.cv_select import VALIDATION, cross_validate, format_selection, parse_select
from heads.joined import joins_in, open_store
from heads.members import Member, collect_members, distinct_folders, find_model_folders, parse_only
from heads.selection import best_by_validation, rank_by_validation
from embedstore.outputs import relative_to_folder
from heads.results import ResultsLock, append_rows, read_runs

ENSEMBLES_FILE = "ensembles.jsonl"
SPLITS = ("val", "test")


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
             multimodal_only: bool = False, select: str = VALIDATION, only: str | Iterable[str] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Average the class probabilities of the top-k saved heads (by recorded validation accuracy) of the
    results folders (those --only names, when given: heads/members.py parse_only), score the average on
    validation and test, and record it in the first folder's ensembles.jsonl. Returns the row
    (`already_recorded` True when an identical run was found and skipped)."""
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
        members, notes, unimodal, not_named = collect_members(results_dirs, multimodal_only=multimodal_only,
                                                              base=base, only=only)
        for note in notes:
            log(note)
        if not_named:
            log(f"--only {','.join(parse_only(only))}: {not_named} saved model(s) left out of the pool")
        # the pool names its members, so --only needs no place of its own in the key (a pattern that keeps every
        # model is the same ensemble)
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
                    "only": list(parse_only(only)), "not_named_left_out": not_named,
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
