"""The results folder of `heads sweep`: every read and write of RESULTS/runs.jsonl goes through here.

- One writer at a time: a sweep holds an exclusive flock on RESULTS/.runs.lock for its whole run, so two sweeps
  into one folder cannot both train the same runs and append them twice (which inflated the report's
  statistics over seeds). The second refuses in one line naming the folder and the holder's command and pid
  (`heads ensemble` takes the same lock to append its row), or waits up to `wait_seconds` for it.
- Appends are whole lines in one write, then fsync. A kill (or a full disk) mid-write can still leave a torn
  final line: readers leave it out with a warning naming file:line, and the next append repairs it (drops the
  torn part, or ends a complete row with its newline) before writing. Any other bad line is an error naming
  file:line, since a row in the middle cannot have been torn by a kill.
"""
from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Iterable

from embedstore.outputs import ExclusiveLock
from embedstore.store import DataWarning
from heads.selection import best_by_validation

RUNS_FILE = "runs.jsonl"
LOCK_FILE = ".runs.lock"


def runs_path(out_dir: str | os.PathLike, name: str = RUNS_FILE) -> Path:
    """RESULTS/runs.jsonl, or another rows file of the folder (`name`, e.g. ensembles.jsonl)."""
    return Path(out_dir) / name


# ----------------------------------------------------------------------------------------------- the lock


class ResultsLock(ExclusiveLock):
    """An exclusive lock on a results folder (context manager). `wait_seconds` 0 refuses at once. `command` and
    `advice` word the refusal for the command that asks (`heads sweep`, `heads ensemble`); the lock file records
    the holder's command, so the refusal names what actually holds the folder."""

    def __init__(self, out_dir: str | os.PathLike, *, command: str = "heads sweep", advice: str | None = None,
                 wait_seconds: float = 0.0, poll_seconds: float = 0.2):
        self.out_dir = Path(out_dir)
        advice = advice or ("one sweep per results folder at a time: wait for it to finish or use another --out"
                            if command == "heads sweep" else "wait for it to finish")
        super().__init__(self.out_dir / LOCK_FILE, command=command, target=f"to {self.out_dir}", advice=advice,
                         wait_seconds=wait_seconds, poll_seconds=poll_seconds)


# ----------------------------------------------------------------------------------------------- reading


def read_runs(out_dir: str | os.PathLike, name: str = RUNS_FILE) -> list[dict]:
    """The rows of RESULTS/runs.jsonl (or RESULTS/`name`; [] when there is none). A torn final line is left out
    with a warning; any other line that is not a JSON object is a ValueError naming file:line."""
    path = runs_path(out_dir, name)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        torn = number == len(lines) and not data.endswith(b"\n")  # the last line, without its newline
        try:
            row = json.loads(raw.decode("utf-8"))
            problem = None if isinstance(row, dict) and "run_key" in row else "a JSON value but not a result row"
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"not a JSON row ({getattr(error, 'msg', None) or error.reason})"
        if problem is None:
            rows.append(row)
        elif torn:
            warnings.warn(f"{path}:{number}: torn final line (a sweep killed mid-write) left out; its run is "
                          "trained again and the line is repaired on the next append", DataWarning, stacklevel=2)
        else:
            raise ValueError(f"{path}:{number}: {problem}; fix or delete that line (other rows are kept)")
    return rows


# ----------------------------------------------------------------------------------------------- appending


def append_rows(out_dir: str | os.PathLike, rows: Iterable[dict], name: str = RUNS_FILE) -> None:
    """Append whole rows to RESULTS/runs.jsonl (or RESULTS/`name`) in one write + fsync, first repairing a torn
    final line. Call it holding the lock."""
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode("utf-8")
    if not lines:
        return
    path = runs_path(out_dir, name)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
    try:
        _repair_torn_tail(descriptor)
        written = 0
        while written < len(lines):  # a regular file takes it in one write; loop only for the odd short write
            written += os.write(descriptor, lines[written:])
        os.fsync(descriptor)
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno or errno.EIO, error.strerror or str(error), str(path)) from None
        raise
    finally:
        os.close(descriptor)


def _repair_torn_tail(descriptor: int) -> None:
    size = os.fstat(descriptor).st_size
    if size == 0 or os.pread(descriptor, 1, size - 1) == b"\n":
        return
    # find the start of the final line: the byte after the last newline
    start, step = size, 1 << 16
    while start > 0:
        begin = max(0, start - step)
        block = os.pread(descriptor, start - begin, begin)
        newline = block.rfind(b"\n")
        if newline >= 0:
            start = begin + newline + 1
            break
        start = begin
    tail = os.pread(descriptor, size - start, start)
    try:
        complete = isinstance(json.loads(tail.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        complete = False
    if complete:
        os.write(descriptor, b"\n")  # a whole row that only lost its newline
    else:
        os.ftruncate(descriptor, start)  # the torn part of a row that was never whole


def resolve_store_path(recorded: str, out_dir: str | os.PathLike) -> Path:
    """A row's (or saved head's) store path: relative to the results folder, or absolute in older rows."""
    path = Path(recorded)
    return path if path.is_absolute() else Path(out_dir) / path


def best_of_sweep(out_dir: Path, keys) -> dict | None:
    """The best model of a sweep's rows (`keys`: its run keys, trained now or already there) by validation
    (heads/selection.py; ties: the cell name, then the seed, that sort first): {"cell", "seed", "strategy",
    "val_accuracy", "test_accuracy"}; diverged heads are not candidates. None when there is no row."""
    rows = [r for r in read_runs(out_dir) if r["run_key"] in keys and not r.get("diverged")
            and r.get("best_val_accuracy") is not None]
    best = best_by_validation(rows, val=lambda r: r["best_val_accuracy"], name=lambda r: (r["cell"], r["seed"]))
    if best is None:
        return None
    return {"cell": best["cell"], "seed": best["seed"], "strategy": best["strategy"],
            "val_accuracy": best["best_val_accuracy"], "test_accuracy": best["test_accuracy"]}
