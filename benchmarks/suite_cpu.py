"""Where the test suite's time goes: CPU seconds per test, its own process and the processes it waited for.

A pytest plugin and its report. Wall time per test misleads under `pytest -n auto` (three workers share two
cores, so a test's wall time says as much about its neighbours as about itself); CPU time does not, and the
suite's wall time is about its CPU time over the cores. Run from the repository root:

    PYTHONPATH=benchmarks .venv/bin/python -m pytest -q -n auto -p suite_cpu   # writes suite_cpu.jsonl
    .venv/bin/python benchmarks/suite_cpu.py suite_cpu.jsonl                    # the report

"children" counts the subprocesses a test started and waited for (CLI runs, torchrun ranks, --jobs workers); a
process it killed or never waited for (a forkserver) is not counted. SUITE_CPU_OUT names another output file.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time
from pathlib import Path

import pytest

OUT = Path(os.environ.get("SUITE_CPU_OUT", "suite_cpu.jsonl"))


def _cpu() -> tuple[float, float]:
    own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, waited.ru_utime + waited.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown together: a module fixture's cost lands on the first test that builds it."""
    own0, waited0 = _cpu()
    start = time.time()
    yield
    own1, waited1 = _cpu()
    with OUT.open("a") as handle:   # one short line per test: workers append whole lines
        handle.write(json.dumps({"test": item.nodeid, "own": round(own1 - own0, 3),
                                 "children": round(waited1 - waited0, 3), "wall": round(time.time() - start, 3),
                                 "start": start, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}) + "\n")


def cpu(row: dict) -> float:
    return row["own"] + row["children"]


def report(path: Path, top: int) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no tests recorded")
    span = max(r["start"] + r["wall"] for r in rows) - min(r["start"] for r in rows)
    print(f"{len(rows)} tests, {sum(map(cpu, rows)):.0f} CPU s ({sum(r['own'] for r in rows):.0f} in the test "
          f"processes, {sum(r['children'] for r in rows):.0f} in processes they waited for), {span:.0f} s from "
          "the first test's start to the last one's end")
    print(f"\nthe {top} costliest tests (CPU s = own + children; wall s):")
    for r in sorted(rows, key=cpu, reverse=True)[:top]:
        print(f"  {cpu(r):6.1f} = {r['own']:5.1f} + {r['children']:5.1f}   {r['wall']:5.1f}   {r['test']}")
    by_file = collections.Counter()
    for r in rows:
        by_file[r["test"].split("::")[0]] += cpu(r)
    print("\nby file (CPU s):")
    for name, seconds in by_file.most_common(top):
        print(f"  {seconds:6.1f}   {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", type=Path, nargs="?", default=OUT)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    report(args.jsonl, args.top)


if __name__ == "__main__":
    main()
