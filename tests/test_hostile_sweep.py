"""Issue #19, the sweep side of a hostile tester's findings: metrics that agree across row kinds, NaN rows in a
streamed store, workers that die with their parent, stores a sweep cannot fully serve, a full disk, a feature
set still being written, and the closing lines.

Each test reproduces one finding and checks the guarantee that fixes it.
"""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cli.heads import heads
from embedstore.store_writer import write_store_from_arrays
from heads.decision import DecisionFits, LinearSettings
from heads.estimator import FusionHead
from heads.models import HeadConfig
from heads.results import read_runs
from heads.train import HeadData, TrainSettings, train_heads
from tests.cli_helpers import invoke as run

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
IMAGE, TEXT = "image/img/pooled", "text/txt/pooled"
FAST = TrainSettings(batch_size=16, max_epochs=3, patience=2, lr=3e-3)


def features(y: np.ndarray, dim: int, rng, n_classes: int) -> np.ndarray:
    """Class-dependent features: far apart class means plus unit noise, (n, dim) float32."""
    return (rng.normal(size=(n_classes, dim))[y] * 3 + rng.normal(size=(len(y), dim))).astype(np.float32)


def make_store(path, *, per_split=(6, 3, 3), n_classes=3, extra=None, seed=0, more_sets=()):
    """Items class by class (as a manifest stores them), each class dealt `per_split` (train, val, test) items, or
    `extra[class]` in place of it for some classes; two pooled sets (IMAGE 10-d, TEXT 6-d) and `more_sets` (names,
    8-d each)."""
    rng = np.random.default_rng(seed)
    y, split = [], []
    for c in range(n_classes):
        counts = (extra or {}).get(c, per_split)
        for name, k in zip(("train", "val", "test"), counts):
            y += [c] * k
            split += [name] * k
    y = np.array(y)
    sets = {IMAGE: (features(y, 10, rng, n_classes), {"parameters": 10}),
            TEXT: (features(y, 6, rng, n_classes), {"parameters": 5}),
            **{name: (features(y, 8, rng, n_classes), {"parameters": 7}) for name in more_sets}}
    return write_store_from_arrays(path, ids=[f"item{i}" for i in range(len(y))], labels=y, splits=split,
                                   classes=[f"class{c}" for c in range(n_classes)], features=sets,
                                   manifest_sha256="m")


# ------------------------------------------------------------------------------------ metrics (item 5)


class _HeadAsDecisionModel:
    """A trained head behind the decision-level models' scoring (DecisionFits.test_metrics): same predictions."""
    strategy = "LF"   # reads [image, text], as the head does

    def __init__(self, head: FusionHead):
        self.head = head

    def predict_log_proba(self, parts):
        return np.log(self.head.predict_proba(parts) + 1e-30)


def test_a_split_missing_a_class_gives_one_macro_f1_on_the_head_and_the_decision_path():
    """Test lacks class 2: the head's row and a decision-level row must score the same predictions alike (macro-F1
    over all three classes), not one over the classes present and the other over all."""
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 20 + [0, 1, 2] * 5 + [0, 1] * 10)   # train 60, val 15, test 20 (no class 2)
    split = np.array(["train"] * 60 + ["val"] * 15 + ["test"] * 20)
    xs = [features(y, 8, rng, 3), features(y, 5, rng, 3)]
    data = HeadData.from_arrays(xs, y, split)
    config = HeadConfig("2A", "concat", (8, 5), 3)
    [result] = train_heads(config, [0], data, TrainSettings(batch_size=16, max_epochs=10, lr=1e-2))
    head = FusionHead.from_trained(config, result.params, np.arange(3), seed=0)
    test = split == "test"
    predicted = head.predict([x[test] for x in xs])
    assert 2 not in predicted.tolist()   # the case where the two averages differ: class 2 neither true nor predicted

    fits = DecisionFits(data, {"image": 0, "text": 1}, 3, LinearSettings())
    decision = fits.test_metrics(_HeadAsDecisionModel(head))
    assert result.test_accuracy == decision["accuracy"]
    assert result.test_macro_f1 == pytest.approx(decision["macro_f1"])


# ------------------------------------------------------------------------------------ NaN rows streamed (item 9)


def test_nan_rows_of_a_streamed_store_are_left_out_counted_and_said_as_in_memory(tmp_path):
    """Rows marked ok that hold NaN/inf: the streamed path (a small --memory-budget) leaves them out, counts them and
    says so in one line, like the in-memory path, instead of training on NaN and failing in scikit-learn."""
    store = make_store(tmp_path / "s.h5", per_split=(12, 4, 4))
    with h5py.File(store, "r+") as f:   # a hand edit: NaN into 3 ok image rows, inf into one text row
        f[f"features/{IMAGE}"][2:5] = np.nan
        f[f"features/{TEXT}"][30, 1] = np.inf
    args = ["sweep", store, "--strategies", "2A,LF", "--fusions", "concat", "--seeds", "0", "--max-epochs", "3",
            "--batch-size", "16", "--device", "cpu", "--no-progress", "--jobs", "1", "--no-baselines"]
    counts = {}
    for budget in ("2000", "1GB"):   # streamed, then in memory
        out = tmp_path / f"r-{budget}"
        result = run(heads, [*args, "--memory-budget", budget, "--out", out])
        assert result.exit_code == 0, result.output
        warned = [line for line in result.output.splitlines() if "NaN or inf" in line]
        assert len(warned) == 1 and f"feature set {IMAGE} has 3 rows" in warned[0]   # one line for both sets
        assert f"feature set {TEXT} has 1 row " in warned[0] and "4 rows left out" in warned[0]
        rows = read_runs(out)
        assert {r["strategy"] for r in rows} == {"2A", "LF"}
        assert all(r["test_accuracy"] is not None and np.isfinite(r["test_accuracy"]) for r in rows)
        stores = [r["store"] for r in rows]
        counts[budget] = {k: stores[0][k] for k in ("rows", "skipped_rows", "non_finite_rows", "split_rows")}
        assert stores[0]["data_access"] == ("streamed" if budget == "2000" else "in memory")
    assert counts["2000"] == counts["1GB"]
    assert counts["2000"]["non_finite_rows"] == {IMAGE: 3, TEXT: 1} and counts["2000"]["rows"] == 60 - 4


# ------------------------------------------------------------------------- stores a sweep cannot fully serve (item 13)


def test_a_one_class_store_is_refused_in_one_line_before_any_work(tmp_path):
    store = make_store(tmp_path / "s.h5", n_classes=1)
    result = run(heads, ["sweep", store, "--out", tmp_path / "r", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "one class ('class0'): nothing to classify" in result.output
    assert not (tmp_path / "r" / "runs.jsonl").exists()


def test_a_default_sweep_over_a_class_dealt_1_1_1_ends_and_says_why_st_is_skipped(tmp_path):
    """`embed prepare --fractions` deals a class of 3 items 1/1/1: stacking's folds cannot hold it. The default sweep
    trains everything else and skips ST with a note, on the first run and on a rerun (no failure at the end)."""
    store = make_store(tmp_path / "s.h5", extra={2: (1, 1, 1)})
    args = ["sweep", store, "--out", tmp_path / "r", "--seeds", "0", "--fusions", "concat", "--max-epochs", "2",
            "--batch-size", "16", "--device", "cpu", "--no-progress", "--jobs", "1"]
    first = run(heads, args)
    assert first.exit_code == 0, first.output
    why = "skipped ST: stacking's out-of-fold predictions need at least 2 train rows of every class, and class " \
          "'class2' has 1 train row"
    assert why in first.output
    strategies = {r["strategy"] for r in read_runs(tmp_path / "r")}
    assert strategies == {"2A", "2B", "image", "text", "LF", "LR-image", "LR-text", "LR-concat"}
    again = run(heads, args)
    assert again.exit_code == 0 and why in again.output and "trained 0 models" in again.output, again.output


def test_stacking_takes_fewer_folds_when_a_class_has_fewer_train_rows_and_says_so():
    from heads.decision import stacking_folds

    assert stacking_folds(np.array([0] * 9 + [1] * 7), 5) == (5, None)
    k, why = stacking_folds(np.array([0] * 9 + [1] * 3 + [2] * 6), 5, ["a", "b", "c"])
    assert k == 3 and why == "3 out-of-fold folds instead of 5: class 'b' has 3 train rows"
    assert stacking_folds(np.array([0] * 9 + [2] * 1), 5)[0] == 1   # an absent class (1) is not a fold's concern


# ------------------------------------------------------------------ a feature set still being written (item 17)


def being_written(store, name):
    """Mark a set as `embed extract --add` leaves it while writing: not complete."""
    modality, source, layer = name.split("/")
    with h5py.File(store, "r+") as f:
        f[f"features/{name}"].attrs["complete"] = False
        f[f"features/{modality}/{source}"].attrs["complete"] = False


def test_a_default_sweep_skips_a_feature_set_still_being_written_and_sweeps_the_rest(tmp_path):
    store = make_store(tmp_path / "s.h5", more_sets=("image/new/pooled",))
    being_written(store, "image/new/pooled")
    args = ["sweep", store, "--out", tmp_path / "r", "--strategies", "2A,LF", "--fusions", "concat", "--seeds", "0",
            "--max-epochs", "2", "--device", "cpu", "--no-progress", "--jobs", "1"]
    result = run(heads, args)
    assert result.exit_code == 0, result.output
    [note] = [line for line in result.output.splitlines() if "image/new/pooled" in line]
    assert "still being written" in note and "--image-source NAME" in note and note.startswith("skipped 3 cell(s)")
    rows = read_runs(tmp_path / "r")
    assert {r["image_source"] for r in rows if r["image_source"]} == {"img"} and len(rows) == 4   # 2A, LF, baselines

    named = run(heads, [*args, "--image-source", "new"])   # asking for the set being written: refused, named
    assert named.exit_code == 2 and len(named.output.strip().splitlines()) == 1, named.output
    assert "image/new/pooled" in named.output and "still being written" in named.output


def test_a_sweep_with_nothing_but_a_set_being_written_to_read_is_refused_naming_it(tmp_path):
    store = make_store(tmp_path / "s.h5")
    being_written(store, IMAGE)
    result = run(heads, ["sweep", store, "--out", tmp_path / "r", "--strategies", "2A", "--no-baselines",
                         "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"feature set {IMAGE}" in result.output and "still being written" in result.output


# ----------------------------------------------------------------------------------- a full disk (item 14)

FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"   # safetensors' words


def disk_fills_up(monkeypatch, module):
    from safetensors import SafetensorError

    def save_file(*args, **kwargs):
        raise SafetensorError(FULL_DISK)

    monkeypatch.setattr(module, "save_file", save_file)


@pytest.mark.parametrize("strategy, folder", [("2A", "2A-concat"), ("LF", "LF")])
def test_a_full_disk_while_saving_a_head_is_one_line_naming_its_folder(tmp_path, monkeypatch, strategy, folder):
    import embedstore.model_folder as model_folder

    store = make_store(tmp_path / "s.h5")
    args = ["sweep", store, "--out", tmp_path / "r", "--strategies", strategy, "--fusions", "concat", "--seeds", "0",
            "--no-baselines", "--max-epochs", "2", "--device", "cpu", "--no-progress", "--jobs", "1"]
    with monkeypatch.context() as patch:
        disk_fills_up(patch, model_folder)
        result = run(heads, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == \
        f"Error: No space left on device (while saving): {tmp_path / 'r' / 'heads' / folder}"
    assert not list((tmp_path / "r" / "heads").glob(".*writing*"))   # no half-written folder left behind
    assert read_runs(tmp_path / "r") == []   # the head is saved before its rows: no rows without their head
    again = run(heads, args)   # with room again, the rerun trains and records it
    assert again.exit_code == 0 and len(read_runs(tmp_path / "r")) == 1, again.output


def test_a_full_disk_while_saving_a_module_or_a_checkpoint_names_the_path(tmp_path, monkeypatch):
    import embedstore.model_folder as model_folder
    import embedstore.training as training
    from embedstore.modules import build_module

    module = build_module("text", 2, 3, name="tiny-bert", pretrained=False)
    disk_fills_up(monkeypatch, model_folder)
    with pytest.raises(OSError) as caught:
        module.save(tmp_path / "module", classes=["a", "b", "c"], manifest_sha256="m")
    assert (caught.value.errno, caught.value.filename) == (28, str(tmp_path / "module"))
    disk_fills_up(monkeypatch, training)
    with pytest.raises(OSError) as caught:
        training._save_tensors(tmp_path / "checkpoint.safetensors", {"w": torch.zeros(2)}, 1)
    assert (caught.value.errno, caught.value.filename) == (28, str(tmp_path / "checkpoint.safetensors"))


# ------------------------------------------------------------------- workers end with the sweep (items 10, 18)


def _session(sid: int) -> dict[int, bytes]:
    """The live processes of session `sid` (Linux /proc): pid -> command line. Zombies count as gone."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()   # state, ppid, pgrp, session, ...
            if int(fields[3]) == sid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
    return found


def _workers(sid: int) -> list[int]:
    return [pid for pid, command in _session(sid).items() if b"spawn_main" in command]


def _python_started(pid: int) -> bool:
    """Whether the worker's Python has installed its SIGINT handler (so a Ctrl-C would raise KeyboardInterrupt
    in it: the start-up window, while it imports its modules)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        caught = int(next(line for line in status if line.startswith("SigCgt:")).split()[1], 16)
        return bool(caught & (1 << (signal.SIGINT - 1)))
    return False


def _holds_features(pid: int) -> bool:
    """Whether the worker has its task: the sweep's features, shared by torch, mapped into it."""
    with contextlib.suppress(OSError):
        return b"/dev/shm/torch_" in Path(f"/proc/{pid}/maps").read_bytes()
    return False


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT during start-up"])
def test_jobs_2_workers_end_with_the_sweep_however_it_is_stopped(tmp_path, how):
    """kill -9 or SIGTERM of a `--jobs 2` sweep while its workers train leaves no orphan workers (each holding the
    features: ~700 MB on the real catalog, training on for minutes); Ctrl-C (SIGINT to the process group, as a
    terminal sends it) while the workers start ends them without a traceback."""
    store = make_store(tmp_path / "s.h5", per_split=(40, 10, 10), n_classes=4)
    # four cells of long training on two workers: the sweep is busy whenever it is stopped
    args = [sys.executable, "-m", "cli.heads", "sweep", str(store), "--out", str(tmp_path / "r"), "--seeds", "0",
            "--strategies", "2A", "--fusions", "add,product,concat,gated", "--no-group-cells", "--no-baselines",
            "--max-epochs", "10000", "--patience", "10000", "--batch-size", "4", "--jobs", "2", "--device", "cpu",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)   # its own session and process group: the sweep, its workers
    try:
        _wait_for(lambda: len(_workers(sweep.pid)) == 2 or sweep.poll() is not None, 240, "two workers")
        assert sweep.poll() is None, sweep.communicate()[1].decode()[-2000:]
        workers = _workers(sweep.pid)
        if how == "SIGINT during start-up":
            _wait_for(lambda: any(_python_started(pid) for pid in workers), 60, "a worker's Python to start")
            os.killpg(sweep.pid, signal.SIGINT)
        else:   # once both train (a worker killed while fetching its task would die anyway, of the failed fetch)
            _wait_for(lambda: all(_holds_features(pid) for pid in workers), 240, "the workers to hold their tasks")
            os.kill(sweep.pid, getattr(signal, how))
        _wait_for(lambda: not set(workers) & set(_workers(sweep.pid)), 30, "the workers to end")
        _, stderr = sweep.communicate(timeout=60)
    finally:
        for pid in _session(sweep.pid):   # whatever is left (before the fix: the orphaned workers)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    if how == "SIGINT during start-up":
        assert sweep.returncode == 1 and b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr, stderr
        assert stderr.decode().strip().splitlines()[-1] == "Aborted!"
    else:
        assert sweep.returncode == -getattr(signal, how)


# ------------------------------------------------------------------------------ the closing lines (item 18)

SUMMARY = {"trained": 7, "skipped": 0, "seconds": 3.0, "jobs": 2, "ranks": 1, "device": "cpu", "precision": "fp32",
           "gflops": 12.1, "peak_gflops": 10.0}


def test_a_sweep_faster_than_the_short_peak_says_so_instead_of_a_share_over_100_percent(tmp_path, monkeypatch):
    import heads.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "run_sweep", lambda *args, **kwargs: dict(SUMMARY))
    result = run(heads, ["sweep", tmp_path / "s.h5", "--out", tmp_path / "r", "--verbose"])   # throughput: --verbose
    assert result.exit_code == 0, result.output
    assert "121 %" not in result.output
    assert "training matmuls: 12.1 GFLOP/s (fp32), above the short matmul peak measured now (10.0 GFLOP/s on the " \
           "same 2 core(s))" in result.output


def test_throughput_is_all_ranks_against_the_peak_times_the_ranks():
    from heads.throughput import throughput_line

    assert throughput_line({**SUMMARY, "gflops": 8.0}) == \
        "training matmuls: 8.0 GFLOP/s (fp32) = 80 % of a 10.0 GFLOP/s matmul peak measured now on the same 2 core(s)"
    assert throughput_line({**SUMMARY, "ranks": 2}) == ("training matmuls: 12.1 GFLOP/s (fp32) over 2 ranks = 60 % of "
                                                       "a 10.0 GFLOP/s x 2 ranks matmul peak measured now on the same "
                                                       "2 core(s)")
    assert throughput_line({**SUMMARY, "gflops": None}) is None


def test_only_rank_0_prints_the_closing_summary(tmp_path, monkeypatch):
    """Under torchrun rank 0 records every rank's rows; another rank's summary ("trained 0 models") is not the
    sweep's."""
    import heads.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "run_sweep", lambda *args, **kwargs: {**SUMMARY, "trained": 0, "gflops": None})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run(heads, ["sweep", tmp_path / "s.h5", "--out", tmp_path / "r"])
    assert result.exit_code == 0 and result.output == "", result.output
    monkeypatch.setenv("RANK", "0")
    assert "trained 0 models" in run(heads, ["sweep", tmp_path / "s.h5", "--out", tmp_path / "r"]).output
