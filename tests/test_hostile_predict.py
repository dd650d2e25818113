"""Issue #19: `heads predict` and `heads ensemble` under a hostile tester. Two predicts into one output, a predict
stopped by SIGTERM or Ctrl-C, non-finite or overflowing numbers in decision-level models and ensemble members,
damaged `linear` model folders, results folders named twice or from different manifests, and the results
folder lock's refusal naming the command that holds it."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.heads import heads
from tests.cli_helpers import invoke as run
from tests.test_hostile_outputs import one_line, world, write_csv  # noqa: F401 (world: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

# `heads predict` in a process of its own that, once it has written its first batch (so it holds the output's
# lock and its .partial exists), makes the file READY and waits for the file GO: a run paused mid-write on a
# condition the test controls, not on a timing guess
PAUSED_PREDICT = """
import os, signal, sys, time
import heads.predict as predict

signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises even where the test runner ignores it
original = predict._write_rows

def write_rows(*args, **kwargs):
    original(*args, **kwargs)
    if not os.path.exists(os.environ["READY"]):
        open(os.environ["READY"], "w").close()
        deadline = time.monotonic() + 120  # never hang a test run for good
        while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
            time.sleep(0.02)

predict._write_rows = write_rows
from cli.heads import main
sys.argv = ["heads", *sys.argv[1:]]
main()
"""


def environment(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "READY": str(tmp_path / "ready"),
            "GO": str(tmp_path / "go")}


def predict_args(world, inputs, out):
    return ["predict", str(world["head"]), str(inputs), "--out", str(out), "--workers", "0", "--batch-size", "1",
            "--device", "cpu"]


def start_paused(world, tmp_path, inputs, out) -> subprocess.Popen:
    """A predict paused after its first row; returns once it is there (or fails with its output)."""
    script = tmp_path / "paused_predict.py"
    script.write_text(PAUSED_PREDICT)
    process = subprocess.Popen([sys.executable, str(script), *predict_args(world, inputs, out)],
                               env=environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (tmp_path / "ready").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the paused predict ended before its first batch: {process.communicate()}")
        time.sleep(0.05)
    return process


def ids_in(path) -> list[str]:
    with open(path, newline="") as handle:
        return [row["id"] for row in csv.DictReader(handle)]


def many_and_few(world, tmp_path):
    """The world's products under many ids (the first run) and one product under another id (the second)."""
    many = tmp_path / "many.csv"
    write_csv(many, [{**world["rows"][i % 2], "id": f"m{i}"} for i in range(6)])
    few = tmp_path / "few.csv"
    write_csv(few, [{**world["rows"][0], "id": "f0"}])
    return many, few


# ----------------------------------------------------------------------------------------------- predict


def test_a_second_predict_into_the_same_output_is_refused_while_the_first_writes(world, tmp_path):
    many, few = many_and_few(world, tmp_path)
    out_dir = tmp_path / "out"
    out = out_dir / "o.csv"
    first = start_paused(world, tmp_path, many, out)
    try:
        second = subprocess.run([sys.executable, "-m", "cli.heads", *predict_args(world, few, out)],
                                env=environment(tmp_path), capture_output=True, text=True, timeout=180)
    finally:
        (tmp_path / "go").touch()
        first_output = first.communicate(timeout=180)
    assert first.returncode == 0, first_output
    assert second.returncode == 2 and "Traceback" not in second.stderr, second
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "another `heads predict`" in lines[0], second.stderr
    assert f"pid {first.pid}" in lines[0] and str(out) in lines[0] and "--out" in lines[0]
    assert "predicted" not in second.stdout  # no claim of rows it never wrote
    assert ids_in(out) == [f"m{i}" for i in range(6)]  # the first run's rows, whole
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.csv"]  # no lock file or .partial left behind
    # the lock went with the first run: now the second one writes
    result = run(heads, predict_args(world, few, out))
    assert result.exit_code == 0 and "predicted 1 of 1 rows" in result.output, result.output
    assert ids_in(out) == ["f0"]


@pytest.mark.parametrize("stop, code, line", [(signal.SIGTERM, 128 + signal.SIGTERM, "Error: stopped by SIGTERM"),
                                              (signal.SIGINT, 1, "Aborted!")])
def test_a_predict_stopped_mid_write_leaves_no_partial_file(world, tmp_path, stop, code, line):
    many, _ = many_and_few(world, tmp_path)
    out_dir = tmp_path / "out"
    (out_dir).mkdir()
    (out_dir / "o.csv").write_text("id\nan earlier run\n")
    process = start_paused(world, tmp_path, many, out_dir / "o.csv")
    assert (out_dir / "o.csv.partial").exists()  # it was mid-write
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.csv"]  # no .partial, no lock file
    assert (out_dir / "o.csv").read_text() == "id\nan earlier run\n"  # the earlier output untouched
