"""Steps of a long job, each skipped when its inputs have not changed (`embed paper`, pipelines/paper.py).

Every step writes a JSON stamp of its inputs beside its output (`<output>.stamp.json`) and is skipped when the
stamp matches and says finished. A changed input removes the stale output first, except for the inputs the
step names `resumable` (it continues from its output: a sweep given more seeds keeps its runs).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from embedstore.fingerprint import fingerprint
from embedstore.outputs import write_text_atomic

STAMP_SUFFIX = ".stamp.json"



def as_json(value):
    """JSON-normalised (tuples -> lists, paths -> str), so a stamp read back compares equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def digest(inputs: dict) -> str:
    return fingerprint(inputs)


def stamp_path(output: Path) -> Path:
    return output.with_name(output.name + STAMP_SUFFIX)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_step(label: str, output: Path, inputs: dict, work: Callable[[], None], log: Callable[[str], None], *,
             resumable: tuple[str, ...] = ()) -> str:
    """Run `work` unless `output` exists with a finished stamp of these `inputs`; returns the inputs' digest.

    `resumable`: input keys whose change keeps the old output (the step continues from it)."""
    inputs = as_json(inputs)
    path = stamp_path(output)
    old = json.loads(path.read_text()) if path.is_file() else None
    if old and old["inputs"] == inputs and old["finished"] and output.exists():
        log(f"{label}: skipped (current; ran {old['seconds']:.1f} s at {old['finished_at']})")
        return digest(inputs)
    reason = "new"
    if old and old["inputs"] != inputs:
        changed = sorted(k for k in set(old["inputs"]) | set(inputs) if old["inputs"].get(k) != inputs.get(k))
        if not set(changed) <= set(resumable):
            _remove(output)  # made from other inputs: stale
        reason = f"changed: {', '.join(changed)}"
    elif old:
        reason = "resuming an unfinished run" if output.exists() else "output missing"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"inputs": inputs, "finished": False}, indent=1, sort_keys=True) + "\n")
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    write_text_atomic(path, json.dumps({"inputs": inputs, "finished": True, "seconds": seconds,
                                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1, sort_keys=True)
                      + "\n")
    log(f"{label}: run ({reason}) in {seconds:.1f} s")
    return digest(inputs)
