"""The summary a sweep returns, kept as it goes: models trained per kind, cells skipped, run keys seen."""
from __future__ import annotations

from pathlib import Path

KEYS = "_run_keys"   # the summary's private set of the sweep's run keys, popped before it is returned


def new_summary(*, jobs: int, ranks: int, device) -> dict:
    return {"trained": 0, "trained_by_kind": {}, "skipped": 0, "cells": [], "notes": [], "jobs": jobs,
            "ranks": ranks, "device": str(device), "train_flops": 0.0, KEYS: set()}


def seeds_to_run(cell, keys: dict[int, str], done: set, summary: dict, log, out_dir: Path) -> list[int]:
    """The seeds of `cell` whose run key is not in runs.jsonl yet; the others are counted (and, when none is
    left, logged) as skipped. Every key is kept: the closing summary's best model is chosen among them."""
    summary[KEYS].update(keys.values())
    todo = [s for s in keys if keys[s] not in done]
    summary["skipped"] += len(keys) - len(todo)
    if not todo:
        log(f"{cell.name}: all {len(keys)} seeds already in {out_dir / 'runs.jsonl'}; skipped")
    return todo


def count(summary: dict, kind: str, n: int) -> None:
    summary["trained"] += n
    summary["trained_by_kind"][kind] = summary["trained_by_kind"].get(kind, 0) + n
