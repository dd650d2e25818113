"""Heads trained on splits streamed from the store (heads/streamed.py), and `heads sweep --memory-budget`."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

import embedstore.chunks as chunks
from cli.heads import main
from embedstore.store import FeatureStore
from heads.models import HeadConfig
from heads.streamed import StreamedSplit, load_head_data, streamed_head_data
from heads.results import read_runs
from heads.rows import run_key
from heads.sweep import SweepSettings, run_sweep
from heads.train import TrainSettings, train_heads
from store_factory import make_feature_store

pytestmark = pytest.mark.usefixtures("one_thread")

C, N = 4, 400
FAST = TrainSettings(batch_size=32, max_epochs=5, patience=3, lr=3e-3)
NAMES = ["image/img/pooled", "text/txt/pooled"]


@pytest.fixture()
def store_path(tmp_path, monkeypatch):
    """Separable class-dependent features in manifest order (class by class, train/val/test), small chunks so
    that a split spans many blocks."""
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 16 * 24 * 4)   # 16 rows of the 24-d set, 16-row blocks
    return make_feature_store(tmp_path / "s.h5", classes=C, per_class=(60, 15, 25), manifest_sha256="m",
                              features={NAMES[0]: 24, NAMES[1]: 16}, nan_rows={NAMES[0]: [3]}).path  # 3: skipped


def _config(strategy="2A", fusion="concat"):
    return HeadConfig(strategy, fusion, (24, 16), C, dropout=0.3)


def test_streamed_heads_learn_and_batched_equals_sequential(store_path):
    with FeatureStore(store_path) as store:
        data = streamed_head_data(store, NAMES)
        assert isinstance(data.train, StreamedSplit) and len(data.train.stream.blocks) > 10
        assert len(data.train) + len(data.val) + len(data.test) == N - 1
        stacked = train_heads(_config(), [0, 1], data, FAST, batched=True)
        alone = train_heads(_config(), [0, 1], data, FAST, batched=False)
    for a, b in zip(stacked, alone):
        assert a.test_accuracy > 0.9                                       # separable: streaming learns
        assert a.test_accuracy == b.test_accuracy and a.best_epoch == b.best_epoch
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not all(torch.equal(stacked[0].params[k], stacked[1].params[k]) for k in stacked[0].params)


def test_each_epoch_sees_another_order(store_path):
    with FeatureStore(store_path) as store:
        split = streamed_head_data(store, NAMES).train
        gens = [torch.Generator().manual_seed(0)]
        epoch1 = torch.cat([xs[0][0, :, 0] for xs, _ in split.train_batches(gens, 32)])
        epoch2 = torch.cat([xs[0][0, :, 0] for xs, _ in split.train_batches(gens, 32)])
        fresh = torch.cat([xs[0][0, :, 0] for xs, _ in split.train_batches([torch.Generator()], 32)])
    assert torch.equal(epoch1.sort().values, epoch2.sort().values) and not torch.equal(epoch1, epoch2)
    assert torch.equal(epoch1, fresh)     # a head starting now gets epoch 1's order, as it would alone


def test_budget_decides_in_memory_or_streamed(store_path):
    logged = []
    with FeatureStore(store_path) as store:
        _, counts = load_head_data(store, NAMES, device="cpu", budget=10**9, log=logged.append)
        assert counts["data_access"] == "in memory" and not logged
        data, counts = load_head_data(store, NAMES, device="cpu", budget=1000, log=logged.append)
        assert counts["data_access"] == "streamed" and isinstance(data.val, StreamedSplit)
        assert counts["rows"] == N - 1 and counts["split_rows"]["train"] == 239
        assert "exceeds the memory budget of 1.00 kB; streaming" in logged[0]


def test_sweep_streams_under_a_small_budget_with_baselines(store_path, tmp_path):
    settings = SweepSettings(strategies=("2A", "2B"), fusions=("concat",), seeds=(0,), train=FAST, device="cpu",
                             memory_budget=2000)
    run_sweep(store_path, tmp_path / "r", settings, log=lambda _: None)
    rows = read_runs(tmp_path / "r")
    assert {r["cell"] for r in rows} == {"2A-concat", "2B-concat", "image", "text"}
    for r in rows:
        assert r["store"]["data_access"] == "streamed"
        assert r["test_accuracy"] > 0.85, r["cell"]
    baselines = {r["cell"]: r for r in rows if r["strategy"] in ("image", "text")}
    assert baselines["image"]["config"]["input_dims"] == [24] and baselines["text"]["config"]["input_dims"] == [16]


def test_streamed_and_in_memory_runs_of_a_cell_have_their_own_run_keys(store_path, tmp_path):
    # a streamed split is read in another order (blocks, shuffle windows) than an in-memory one: other results,
    # so a rerun with another data access must train the cell again, not skip it as done
    out = tmp_path / "r"
    small = SweepSettings(strategies=("2A",), fusions=("concat",), seeds=(0,), train=FAST, device="cpu",
                          baselines=False, memory_budget=2000)
    first = run_sweep(store_path, out, small, log=lambda _: None)
    again = run_sweep(store_path, out, small, log=lambda _: None)
    assert (first["trained"], again["trained"], again["skipped"]) == (1, 0, 1)
    in_memory = run_sweep(store_path, out, dataclasses.replace(small, memory_budget=None),
                          log=lambda _: None)
    assert in_memory["trained"] == 1
    rows = read_runs(out)
    assert [r["store"]["data_access"] for r in rows] == ["streamed", "in memory"]
    assert rows[0]["run_key"] != rows[1]["run_key"]
    # in-memory keys are those of sweeps made before the data access was recorded
    with FeatureStore(store_path) as store:
        provenance = {n: {k: v for k, v in store.feature_sets[n].provenance.items() if k != "complete"}
                      for n in NAMES}
    config = HeadConfig.from_dict(rows[1]["config"])
    assert rows[1]["run_key"] == run_key(config=config.to_dict(), train=dataclasses.asdict(FAST), seed=0,
                                         manifest_sha256="m", feature_sets=provenance)


def test_cli_memory_budget(store_path, tmp_path):
    args = ["sweep", str(store_path), "--strategies", "2A", "--fusions", "add", "--seeds", "0", "--max-epochs", "2",
            "--device", "cpu", "--no-baselines"]
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "a"), "--memory-budget", "1KiB"])
    assert res.exit_code == 0, res.output
    assert "streaming from the store" in res.output
    assert read_runs(tmp_path / "a")[0]["store"]["data_access"] == "streamed"
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "b")])      # default: half the free memory
    assert res.exit_code == 0 and "streaming" not in res.output
    assert read_runs(tmp_path / "b")[0]["store"]["data_access"] == "in memory"
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "c"), "--memory-budget", "lots"])
    assert res.exit_code == 2 and "memory size 'lots' is not a size" in res.output


def test_float16_store_trains_in_memory_and_streamed(tmp_path):
    make_feature_store(tmp_path / "h.h5", classes=C, per_split=(120, 40, 40), features={NAMES[0]: 24, NAMES[1]: 16},
                       dtype="float16", seed=1)
    with FeatureStore(tmp_path / "h.h5") as store:
        memory, _ = load_head_data(store, NAMES, device="cpu", budget=10**9)
        assert memory.train.inputs[0].dtype == torch.float16                 # half the memory, upcast per batch
        streamed, _ = load_head_data(store, NAMES, device="cpu", budget=1, log=lambda _: None)
        for data in (memory, streamed):
            assert train_heads(_config(), [0], data, FAST)[0].test_accuracy > 0.9


def test_warns_when_a_window_holds_few_classes(tmp_path, monkeypatch):
    """Class by class with many classes: a 16-block window holds a fraction of them, and says so."""
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4 * 24 * 4)   # 4-row blocks
    make_feature_store(tmp_path / "many.h5", classes=100, per_class=(6, 2, 2), separation=0.0,
                       features={NAMES[0]: 24, NAMES[1]: 16})
    logged = []
    with FeatureStore(tmp_path / "many.h5") as store:
        _, counts = load_head_data(store, NAMES, device="cpu", budget=1, log=logged.append)
    assert counts["window_class_share"] < 0.5
    assert any(line.startswith("warning: a shuffle window of 16 blocks holds about") for line in logged)


def test_no_warning_when_windows_hold_most_classes(store_path):
    logged = []
    with FeatureStore(store_path) as store:
        _, counts = load_head_data(store, NAMES, device="cpu", budget=1, log=logged.append)
    assert counts["window_class_share"] >= 0.5 and not any("warning" in line for line in logged)
