"""`heads select`: the single best saved model of one or more results folders, chosen by validation (what
`heads sweep` reports) and by K-fold cross-validation on train + validation (heads/cv_select.py), with each
choice's validation, CV and test accuracy side by side, so the validation split's optimism shows.

    from heads.select import select_model
    doc = select_model(["runs/real/results"], "cv:5")   # doc["by_validation"], doc["by_cv"], doc["candidates"]

Candidates are `heads ensemble`'s members: the saved model folder of each cell (its best seed by validation).
Test accuracy is read from each folder's record, never used to choose.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

from embedstore.model_folder import read_config
from embedstore.outputs import relative_to_folder
from embedstore.defaults import resolve_device
from heads.cv_select import VALIDATION, cross_validate, parse_select
from heads.members import collect_members, distinct_folders, find_model_folders, parse_only
from heads.selection import rank_by_validation


def select_model(results_dirs: Iterable[str | os.PathLike] | str | os.PathLike, select: str = "cv:5", *,
                 multimodal_only: bool = False, only: str | Iterable[str] | None = None, device: str | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """{"select", "by_validation", "by_cv", "candidates" (CV order), "seconds" (the refits)}; each choice is
    {"member", "kind", "val_accuracy", "cv_accuracy", "test_accuracy", "refit_seconds"}."""
    if isinstance(results_dirs, (str, os.PathLike)):
        results_dirs = [results_dirs]
    selection = parse_select(select)
    if selection.how == VALIDATION:
        raise ValueError("--select validation is what `heads sweep` reports; give cv:K (e.g. cv:5) to compare")
    dirs = distinct_folders([Path(r) for r in results_dirs], log)
    for results in dirs:
        find_model_folders(results)
    base = dirs[0]
    members, notes, _, not_named = collect_members(dirs, multimodal_only=multimodal_only, base=base, only=only)
    for note in notes:
        log(note)
    if not_named:
        log(f"--only {','.join(parse_only(only))}: {not_named} saved model(s) left out of the candidates")
    if not members:
        raise ValueError(f"no saved model in {base} (or the other folders) to choose from")
    started = time.perf_counter()
    cv = cross_validate(members, selection, device=resolve_device(device), log=log)
    seconds = time.perf_counter() - started

    def doc(member) -> dict:
        return {"member": relative_to_folder(member.folder, base), "kind": member.kind,
                "val_accuracy": member.val_accuracy, "cv_accuracy": cv.accuracy([member.folder]),
                "cv_fold_accuracies": cv.fold_accuracies(member.folder),
                "test_accuracy": read_config(member.folder).get("test_accuracy"),
                "refit_seconds": cv.seconds[member.folder]}

    by_cv = rank_by_validation(members, val=lambda m: cv.accuracy([m.folder]),
                               name=lambda m: relative_to_folder(m.folder, base))
    candidates = [doc(m) for m in by_cv]
    by_name = {c["member"]: c for c in candidates}
    return {"select": selection.label, "folds": selection.folds, "items": len(cv.ids), "seconds": seconds,
            "by_validation": by_name[relative_to_folder(members[0].folder, base)], "by_cv": candidates[0],
            "candidates": candidates, "notes": notes}


def format_selection_table(doc: dict, top: int = 10) -> str:
    """A Markdown table of the candidates (best by CV first) and one line per choice: validation, CV, test."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f} %"

    lines = [f"| model | validation | {doc['select']} | test |", "|---|---|---|---|"]
    lines += [f"| {c['member']} | {pct(c['val_accuracy'])} | {pct(c['cv_accuracy'])} | {pct(c['test_accuracy'])} |"
              for c in doc["candidates"][:top]]
    for rule, c in (("validation", doc["by_validation"]), (doc["select"], doc["by_cv"])):
        optimism = "" if c["test_accuracy"] is None else \
            f"; validation - test {100 * (c['val_accuracy'] - c['test_accuracy']):+.2f} points"
        lines.append(f"chosen by {rule}: {c['member']} (validation {pct(c['val_accuracy'])}, {doc['select']} "
                     f"{pct(c['cv_accuracy'])}, test {pct(c['test_accuracy'])}{optimism})")
    lines.append(f"{doc['select']} refit {len(doc['candidates'])} models {doc['folds']} times over {doc['items']:,} "
                 f"train + validation items in {doc['seconds']:.1f} s")
    return "\n".join(lines)
