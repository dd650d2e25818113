"""What `heads sweep` tells its user: one progress bar over every model it trains (heads and decision-level
models alike), and a closing summary: models trained by kind, wall time, the best model by validation with its
validation and test accuracy; throughput only with --verbose."""
import re

import numpy as np
import pytest
from click.testing import CliRunner

import heads.sweep
from cli.heads import main
from embedstore.store_writer import write_store_from_arrays
from heads.selection import best_by_validation
from heads.results import read_runs
from heads.sweep import SweepSettings, run_sweep
from heads.train import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")

C = 4
SWEEP = ["--strategies", "2A,LR-text,LF", "--no-baselines", "--fusions", "concat", "--seeds", "0,1",
         "--max-epochs", "3", "--batch-size", "32", "--device", "cpu", "--jobs", "1"]


def make_store(path, n=160):
    rng = np.random.default_rng(0)
    y = np.arange(n) % C
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n // 4))
    features = {f"{m}/tiny-{m}/pooled": (rng.normal(size=(C, d))[y] * 1.5 + rng.normal(size=(n, d)), {"parameters": 9})
                for m, d in (("image", 12), ("text", 8))}
    return write_store_from_arrays(path, ids=[f"i{k}" for k in range(n)], labels=y, splits=split,
                                   classes=[f"class{k}" for k in range(C)], features=features, manifest_sha256="m")


def test_summary_counts_by_kind_names_the_best_by_validation_and_hides_throughput(tmp_path):
    store, out = make_store(tmp_path / "s.h5"), tmp_path / "r"
    runner = CliRunner()
    first = runner.invoke(main, ["sweep", str(store), "--out", str(out), "--no-progress", *SWEEP])
    assert first.exit_code == 0, first.output
    rows = read_runs(out)
    best = best_by_validation(rows, val=lambda r: r["best_val_accuracy"], name=lambda r: (r["cell"], r["seed"]))
    lines = first.output.strip().splitlines()
    assert re.fullmatch(rf"trained 2 heads and 4 decision-level models, skipped 0 already in {re.escape(str(out))}"
                        r"/runs.jsonl, in ([0-9.]+ s|[0-9]+ min [0-9]{2} s)", lines[-2]), lines[-2]
    assert lines[-1].startswith(f"best by validation: {best['cell']} (seed {best['seed']}): validation "
                                f"{100 * best['best_val_accuracy']:.2f} %, test {100 * best['test_accuracy']:.2f} %")
    assert "GFLOP/s" not in first.output and "job(s)" not in first.output

    again = runner.invoke(main, ["sweep", str(store), "--out", str(out), "--no-progress", "--verbose", *SWEEP])
    assert again.exit_code == 0, again.output
    assert "trained 0 models, skipped 6 already in" in again.output
    assert f"best by validation: {best['cell']} (seed {best['seed']})" in again.output   # the grid's rows, kept
    assert "ran on cpu: 1 job(s), 1 rank(s)" in again.output


def test_the_matmul_peak_is_measured_only_for_the_verbose_line(tmp_path, monkeypatch):
    """--verbose shows the throughput beside a measured peak; the peak costs about a second of every core, so a
    sweep that prints no throughput line must not measure it."""
    import heads.sweep

    measured, real_peak = [], heads.sweep.matmul_peak_gflops
    monkeypatch.setattr(heads.sweep, "matmul_peak_gflops", lambda *a, **k: measured.append(a) or real_peak(*a, **k))
    store = make_store(tmp_path / "s.h5")
    args = ["--no-progress", "--strategies", "2A", "--no-baselines", "--fusions", "add", "--seeds", "0",
            "--max-epochs", "2", "--device", "cpu", "--jobs", "1"]
    quiet = CliRunner().invoke(main, ["sweep", str(store), "--out", str(tmp_path / "quiet"), *args])
    assert quiet.exit_code == 0 and "trained 1 heads" in quiet.output, quiet.output
    assert measured == [] and "GFLOP/s" not in quiet.output
    verbose = CliRunner().invoke(main, ["sweep", str(store), "--out", str(tmp_path / "verbose"), "--verbose", *args])
    assert verbose.exit_code == 0, verbose.output
    assert "trained 1 heads, skipped 0" in verbose.output and "GFLOP/s" in verbose.output
    assert len(measured) == 1 and re.search(r"training matmuls: [0-9.]+ GFLOP/s \(fp32\)", verbose.output), \
        verbose.output


def test_one_progress_bar_counts_heads_and_decision_models(tmp_path, monkeypatch):
    bars = []

    class Bar:   # records what the sweep tells its bar
        def __init__(self, total, **kwargs):
            self.total, self.n, self.postfixes, self.closed = total, 0, [], False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix_str(self, text, refresh=True):
            self.postfixes.append(text)

        def close(self):
            self.closed = True

    monkeypatch.setattr(heads.sweep, "tqdm", Bar)
    store = make_store(tmp_path / "s.h5")
    settings = SweepSettings(strategies=("2A", "LR-text", "LF", "ST"), fusions=("concat",), seeds=(0, 1),
                             baselines=False, device="cpu", jobs=1, train=TrainSettings(batch_size=32, max_epochs=2))
    summary = run_sweep(store, tmp_path / "r", settings, log=lambda _: None)
    (bar,) = bars
    assert bar.total == bar.n == 8 and bar.closed   # 2 heads + 6 decision-level models, in one bar
    assert "fitting ST" in bar.postfixes
    assert summary["trained_by_kind"] == {"head": 2, "linear": 6}
