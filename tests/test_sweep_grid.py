"""The sweep's grid and where it trains: defaults from the registries, backbone pairs, strategies the store
allows, `--jobs N` and torchrun ranks giving the rows of one process, and torchrun rounds recorded as they finish
(a killed multi-rank sweep keeps them)."""
import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.heads import heads
from heads.strategies import list_strategies
from embedstore.store import FeatureStore
from heads.fusion import Fusion, _FUSIONS, list_fusions, register_fusion
from heads.grid import build_grid
from heads.report import write_report
from heads.results import read_runs
from heads.sweep import SweepSettings, run_sweep
from heads.train import TrainSettings
from store_factory import make_feature_store

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
C = 4
FAST = TrainSettings(batch_size=32, max_epochs=4, patience=2, lr=3e-3)


def make_store(path, *, image_sources=("img-a",), text_sources=("txt-a",), modules=False, n=160, seed=0):
    features = {f"image/{s}/pooled": 12 for s in image_sources} | {f"text/{s}/pooled": 8 for s in text_sources}
    provenance = {f"image/{s}/pooled": {"backbone": s, "parameters": 10} for s in image_sources}
    if modules:
        features |= {"image/module-i/dense": 6, "text/module-t/dense": 6}
        provenance |= {"image/module-i/dense": {"backbone": image_sources[0]},
                       "text/module-t/dense": {"backbone": text_sources[0]}}
    return make_feature_store(path, classes=C, per_split=(n // 2, n // 4, n // 4), features=features,
                              provenance=provenance, manifest_sha256="m", seed=seed).path


def metrics(rows):
    return {r["run_key"]: (r["cell"], r["seed"], r["test_accuracy"], r["test_macro_f1"], r["best_val_accuracy"],
                           r["best_epoch"], r["epochs_run"]) for r in rows}


def test_default_sweep_takes_what_the_store_allows_and_says_what_it_skipped(tmp_path):
    store = make_store(tmp_path / "s.h5")   # pooled features only: 2A, 2B and the baselines
    logged = []
    summary = run_sweep(store, tmp_path / "r", SweepSettings(seeds=(0,), train=FAST, jobs=1, progress=False),
                        log=logged.append)
    strategies = {r["strategy"] for r in read_runs(tmp_path / "r")}
    # + the decision-level models over pooled features (heads/decision.py); LFM needs module outputs
    assert strategies == {"2A", "2B", "image", "text", "LF", "ST", "LR-image", "LR-text", "LR-concat"}
    assert any("skipped 1A" in line and "--image-module DIR" in line for line in logged)
    assert any("skipped LFM" in line and "--image-module DIR" in line for line in logged)
    assert any("skipped 1B" in line for line in summary["notes"])
    fusions = {r["fusion"] for r in read_runs(tmp_path / "r") if r["strategy"] == "2A"}
    assert fusions == set(list_fusions())


def test_a_newly_registered_operator_is_swept_and_reported(tmp_path):
    @register_fusion("maximum")
    class MaximumFusion(Fusion):
        def forward(self, params, a, b):
            return torch.maximum(a, b)
    try:
        store = make_store(tmp_path / "s.h5")
        run_sweep(store, tmp_path / "r", SweepSettings(strategies=("2A",), seeds=(0,), train=FAST, jobs=1,
                                                       baselines=False, progress=False), log=lambda _: None)
        assert "2A-maximum" in {r["cell"] for r in read_runs(tmp_path / "r")}
        write_report(tmp_path / "r", tmp_path / "rep")
        assert "maximum" in (tmp_path / "rep" / "report.md").read_text()
    finally:
        del _FUSIONS["maximum"]   # private: the registry has no public way to unregister an operator


def test_every_backbone_pair_is_a_grid_dimension_and_sources_can_be_chosen(tmp_path):
    store = make_store(tmp_path / "s.h5", image_sources=("img-a", "img-b"), text_sources=("txt-a", "txt-b"))
    with FeatureStore(store) as s:
        cells, _ = build_grid(s, strategies=("2A",), fusions=("concat",), baselines=True)
        assert [c.name for c in cells] == ["2A-concat@img-a+txt-a", "2A-concat@img-a+txt-b", "2A-concat@img-b+txt-a",
                                           "2A-concat@img-b+txt-b", "image@img-a", "image@img-b", "text@txt-a",
                                           "text@txt-b"]
        chosen, _ = build_grid(s, strategies=("2A",), fusions=("concat",), baselines=False,
                               image_sources=("img-b",), text_sources=("txt-a", "txt-b"))
        assert [c.name for c in chosen] == ["2A-concat@img-b+txt-a", "2A-concat@img-b+txt-b"]
        with pytest.raises(ValueError, match="--image-source nope.*img-a, img-b"):
            build_grid(s, strategies=None, fusions=None, baselines=True, image_sources=("nope",))
    run_sweep(store, tmp_path / "r", SweepSettings(strategies=("2A",), fusions=("add",), seeds=(0,), train=FAST,
                                                   jobs=1, progress=False), log=lambda _: None)
    rows = read_runs(tmp_path / "r")
    assert {(r["image_source"], r["text_source"]) for r in rows if r["strategy"] == "2A"} == \
        {(i, t) for i in ("img-a", "img-b") for t in ("txt-a", "txt-b")}
    assert (tmp_path / "r" / "heads" / "img-b+txt-a" / "2A-add" / "config.json").exists()
    write_report(tmp_path / "r", tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "By backbone pair" in md and "img-b+txt-a" in md


def test_jobs_2_gives_exactly_the_rows_of_jobs_1_with_the_decision_level_models_fit_while_the_heads_train(
        tmp_path, monkeypatch):
    """--jobs 2: the heads train in two workers and the sweep's own process fits LF/LFM/ST/LR-*
    (heads/sweep_decisions.py DecisionThread) while they do, instead of after them: each head result waits (up to a
    minute) for the first decision fit to have started (fit after the heads, it could not have, and the sweep
    fails). Rows and saved models as with --jobs 1."""
    import heads.sweep
    import heads.sweep_decisions

    store = make_store(tmp_path / "s.h5", modules=True)
    decision_started, real_fits, real_run_tasks = threading.Event(), heads.sweep_decisions.DecisionFits, \
        heads.sweep.run_tasks

    def fits(*args, **kwargs):
        decision_started.set()
        return real_fits(*args, **kwargs)

    def run_tasks(groups, **kwargs):
        for finished in real_run_tasks(groups, **kwargs):
            assert decision_started.wait(60), "no decision-level model started while the heads trained"
            yield finished

    settings = dict(fusions=("add", "concat", "gated"), seeds=(0, 1), train=FAST, progress=False)
    one = run_sweep(store, tmp_path / "one", SweepSettings(jobs=1, **settings), log=lambda _: None)
    monkeypatch.setattr(heads.sweep_decisions, "DecisionFits", fits)
    monkeypatch.setattr(heads.sweep, "run_tasks", run_tasks)
    two = run_sweep(store, tmp_path / "two", SweepSettings(jobs=2, **settings), log=lambda _: None)
    assert two["jobs"] == 2 and decision_started.is_set()
    assert one["trained_by_kind"] == two["trained_by_kind"]
    assert two["trained_by_kind"]["linear"] >= 8 and two["trained_by_kind"]["head"] > 10
    assert metrics(read_runs(tmp_path / "one")) == metrics(read_runs(tmp_path / "two"))
    for cell in ("2A-gated", "1A-concat", "text", "ST", "LF"):   # the saved models too
        a = json.loads((tmp_path / "one" / "heads" / cell / "config.json").read_text())
        b = json.loads((tmp_path / "two" / "heads" / cell / "config.json").read_text())
        assert a["run_key"] == b["run_key"] and a["best_val_accuracy"] == b["best_val_accuracy"]


def test_a_failing_decision_level_model_beside_the_heads_fails_the_sweep_after_the_heads(tmp_path, monkeypatch):
    """An error in the DecisionThread is the sweep's error, raised once the heads are recorded (their rows kept)."""
    import heads.sweep_decisions

    def broken(*args, **kwargs):
        raise ValueError("a regression could not be fit")

    monkeypatch.setattr(heads.sweep_decisions, "DecisionFits", broken)
    store = make_store(tmp_path / "s.h5")
    with pytest.raises(ValueError, match="a regression could not be fit"):
        run_sweep(store, tmp_path / "r", SweepSettings(fusions=("concat",), seeds=(0,), train=FAST, progress=False,
                                                       jobs=2), log=lambda _: None)
    rows = read_runs(tmp_path / "r")
    assert {r["strategy"] for r in rows} == {"2A", "2B", "image", "text"}   # every head, no decision-level row


def test_a_sweep_killed_while_decision_models_fit_beside_the_heads_resumes_with_each_row_once(tmp_path):
    """kill -9 of a --jobs 2 default-grid sweep (heads in workers, LF/ST/LR-* in the sweep's thread) once rows are
    being written, then the same sweep again: every run once, none lost, each line whole, as a sweep never killed."""
    import signal
    import time

    store = make_store(tmp_path / "s.h5")
    args = ["--fusions", "add,concat,gated", "--seeds", "0,1", "--max-epochs", "4", "--batch-size", "32",
            "--patience", "2", "--lr", "3e-3", "--no-progress"]
    command = [sys.executable, "-m", "cli.heads", "sweep", str(store), "--out", str(tmp_path / "r"), "--jobs", "2"]
    process = subprocess.Popen(command + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "r" / "runs.jsonl"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not (runs.exists() and runs.read_text()):
        time.sleep(0.05)
    killed_midway = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = len(read_runs(tmp_path / "r")) if runs.exists() else 0
    ok = CliRunner().invoke(heads, ["sweep", str(store), "--out", str(tmp_path / "r"), "--jobs", "2"] + args)
    assert ok.exit_code == 0, ok.output
    clean = CliRunner().invoke(heads, ["sweep", str(store), "--out", str(tmp_path / "clean"), "--jobs", "1"] + args)
    assert clean.exit_code == 0, clean.output
    rows, expected = read_runs(tmp_path / "r"), read_runs(tmp_path / "clean")
    keys = [r["run_key"] for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == {r["run_key"] for r in expected}
    assert {r["strategy"] for r in rows} >= {"LF", "ST", "LR-concat", "2A", "image"}
    if killed_midway:   # the kill landed after the first rows and before the last
        assert 0 < before < len(expected)


def test_cells_of_one_shape_share_a_step_and_give_the_rows_and_heads_of_one_step_per_cell(tmp_path):
    store = make_store(tmp_path / "s.h5", modules=True)
    settings = dict(fusions=("add", "average", "concat"), seeds=(0, 1), train=FAST, progress=False, jobs=1)
    run_sweep(store, tmp_path / "grouped", SweepSettings(**settings), log=lambda _: None)
    run_sweep(store, tmp_path / "cells", SweepSettings(group_cells=False, **settings), log=lambda _: None)
    # the heads' rows (the default grid also fits the decision-level models, which train in no step)
    grouped, cells = ([r for r in read_runs(tmp_path / d) if r["strategy"] not in list_strategies(trainer="linear")]
                      for d in ("grouped", "cells"))
    assert len(grouped) == (3 * 3 + 2) * 2 and metrics(grouped) == metrics(cells)
    size = {r["cell"]: r["group_size"] for r in grouped}
    # add and average of a strategy: 2 cells x 2 seeds in one stack; concat and the baselines: their seeds only
    assert size["2A-add"] == size["2A-average"] == size["1A-average"] == 4
    assert size["2A-concat"] == size["image"] == 2 and {r["group_size"] for r in cells} == {2}
    for cell in ("2A-average", "1A-add", "text"):
        a = (tmp_path / "grouped" / "heads" / cell / "model.safetensors").read_bytes()
        assert a == (tmp_path / "cells" / "heads" / cell / "model.safetensors").read_bytes()


def test_torchrun_two_ranks_give_the_rows_of_one_process(tmp_path):
    store = make_store(tmp_path / "s.h5", modules=True)
    args = ["sweep", str(store), "--fusions", "add,average,gated", "--seeds", "0,1", "--max-epochs", "4",
            "--patience", "2", "--batch-size", "32", "--lr", "0.003", "--jobs", "1", "--no-progress", "--device", "cpu",
            "--verbose"]   # --verbose: where it ran (ranks) is said
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = CliRunner().invoke(heads, args + ["--out", str(tmp_path / "one")])   # one process: this one
    assert one.exit_code == 0, one.output
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "-m", "cli.heads"] + args + ["--out", str(tmp_path / "two")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    rows_one, rows_two = read_runs(tmp_path / "one"), read_runs(tmp_path / "two")
    assert metrics(rows_one) == metrics(rows_two)               # heads and (rank 0's) decision-level models
    heads_two = [r for r in rows_two if r["strategy"] not in list_strategies(trainer="linear")]
    assert len(heads_two) == (3 * 3 + 2) * 2                    # 1A, 2A, 2B x 3 operators + 2 baselines
    assert {r["group_size"] for r in heads_two} == {2, 4}       # add + average stacked, dealt to one rank
    assert "2 rank(s)" in two.stdout


def test_rounds_deal_jobs_groups_at_a_time_largest_first_and_streamed_groups_alone():
    from heads.dispatch import Task, rounds
    from heads.grid import Cell
    from heads.models import HeadConfig

    def group(width):   # one task whose cost grows with its input width
        cell = Cell("2A", "concat", ("a", "b"), ("a", "b"), ("a", "b"))
        return [Task(cell, HeadConfig("2A", "concat", (width, 8), C), [0], {})]

    small, mid, big, streamed = group(4), group(16), group(64), group(8)
    assert rounds([small, big, mid], [streamed], 2) == [([big, mid], 2), ([small], 2), ([streamed], 1)]
    assert rounds([small, big], [], 1) == [([big], 1), ([small], 1)]
    assert rounds([], [], 3) == []
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        rounds([small], [], 0)


def test_under_ranks_rank_0_records_each_round_before_the_next_and_joins_every_round(tmp_path, monkeypatch):
    """The round logic in this process, with a fake rank group standing in for rank 1 (which sends nothing here
    and has one round more): at each gather, every earlier round's rows are already in runs.jsonl."""
    import heads.sweep as sweep

    out = tmp_path / "r"

    class FakeRanks:
        waited = 0.0

        def __init__(self):
            self.at_gather = []   # (rows in runs.jsonl, results this rank sends) at each gather

        def broadcast(self, obj):
            return obj

        def agree_max(self, n):
            return n + 1          # rank 1 has one round more: rank 0 must join it with an empty one

        def gather(self, obj):
            self.at_gather.append((len(read_runs(out)), len(obj)))
            self.waited += 0.5
            return [obj, []]

    ranks = FakeRanks()
    monkeypatch.setattr(sweep, "world", lambda: (0, 2))
    monkeypatch.setattr(sweep, "RankGroup", lambda: ranks)   # without WORLD_SIZE, no process group is joined
    settings = SweepSettings(strategies=("2A",), fusions=("add", "product", "concat", "gated"), seeds=(0,),
                             train=FAST, baselines=False, progress=False, group_cells=False, jobs=1, device="cpu")
    summary = run_sweep(make_store(tmp_path / "s.h5"), out, settings, log=lambda _: None)
    # rank 0's deal: groups 0 and 2 of 4, one per round (--jobs 1), then rank 1's extra round
    assert ranks.at_gather == [(0, 1), (1, 1), (2, 0)]
    assert [r["cell"] for r in read_runs(out)] == ["2A-concat", "2A-add"]   # largest first (its concat layer)
    assert summary["rounds"] == 3 and summary["gather_seconds"] == 1.5 and summary["trained"] == 2


@pytest.mark.slow
def test_a_killed_torchrun_sweep_keeps_its_recorded_rounds_and_a_rerun_trains_only_the_rest(tmp_path):
    """SIGKILL of torchrun and its ranks once rows appear (a lost machine): the rows recorded stay, a 2-rank rerun
    trains exactly the rest, and the final rows are an uninterrupted run's."""
    import signal
    import time

    store = make_store(tmp_path / "s.h5", n=240)
    fusions = ("add", "product", "concat", "gated", "average")
    # seven units of dispatch (5 operators + 2 baselines, one per cell), --jobs 1: four rounds on rank 0, about a
    # second each, so the kill lands while rounds are left
    args = ["sweep", str(store), "--strategies", "2A", "--fusions", ",".join(fusions), "--seeds", "0",
            "--no-group-cells", "--max-epochs", "10", "--patience", "10", "--batch-size", "8", "--lr", "0.001",
            "--jobs", "1", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "r")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                "-m", "cli.heads"] + args
    runs = tmp_path / "r" / "runs.jsonl"
    first = subprocess.Popen(torchrun, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)   # its own process group: torchrun, both ranks, their workers
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not (runs.exists() and runs.read_bytes()):
            time.sleep(0.02)
        assert first.poll() is None, "the sweep ended before any row was seen"
    finally:
        # torchrun starts each rank in a session of its own, so killing torchrun's group would leave the ranks
        # running: kill torchrun's group, then each rank's (a rank's group holds its --jobs workers too)
        ranks = _children(first.pid)
        os.killpg(first.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        first.wait()
    kept = read_runs(tmp_path / "r")
    assert 1 <= len(kept) < 7

    rest = subprocess.run(torchrun, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert f"trained {7 - len(kept)} heads, skipped {len(kept)}" in rest.stdout, rest.stdout
    whole = run_sweep(store, tmp_path / "whole", SweepSettings(
        strategies=("2A",), fusions=fusions, seeds=(0,), group_cells=False, jobs=1, progress=False, device="cpu",
        train=TrainSettings(batch_size=8, max_epochs=10, patience=10, lr=1e-3)), log=lambda _: None)
    final = read_runs(tmp_path / "r")
    assert whole["trained"] == len(final) == 7
    assert metrics(final) == metrics(read_runs(tmp_path / "whole"))
    assert metrics(kept).items() <= metrics(final).items()    # the kept rows are the whole run's, unchanged


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # the parent pid is the 2nd field after the command name, which is in parentheses and may hold spaces
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_a_worker_killed_with_sigkill_is_one_line_and_the_finished_cells_are_kept(tmp_path):
    """kill -9 of a worker mid-sweep gives one OSError line; the cells recorded before it stay, and a rerun
    finishes exactly the rest."""
    import multiprocessing
    import signal
    import threading
    import time

    store = make_store(tmp_path / "s.h5", n=240)
    slow = TrainSettings(batch_size=8, max_epochs=10, patience=10, lr=1e-3)   # a second or so per cell
    # one unit of dispatch per cell (add and product would share one stack): four units for two workers, so
    # the kill lands while work is left
    settings = dict(strategies=("2A",), fusions=("add", "product", "concat", "gated"), seeds=(0,), train=slow,
                    baselines=False, progress=False, group_cells=False)

    def kill_a_worker_after_the_first_row():
        deadline = time.time() + 120
        while time.time() < deadline:
            children = multiprocessing.active_children()
            if children and (tmp_path / "r" / "runs.jsonl").exists():
                os.kill(children[0].pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_after_the_first_row)
    killer.start()
    with pytest.raises(OSError, match="worker process died"):
        run_sweep(store, tmp_path / "r", SweepSettings(jobs=2, **settings), log=lambda _: None)
    killer.join()
    kept = len(read_runs(tmp_path / "r"))
    assert 1 <= kept < 4
    rest = run_sweep(store, tmp_path / "r", SweepSettings(jobs=1, **settings), log=lambda _: None)
    assert rest["trained"] == 4 - kept and rest["skipped"] == kept and len(read_runs(tmp_path / "r")) == 4
