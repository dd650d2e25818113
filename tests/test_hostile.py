"""Issue #10, "Nothing silent, nothing lost": non-finite features, unchecked numbers, lost or duplicated work.

Each test reproduces one finding of a hostile-but-fair run of the tools and checks the guarantee that fixes it
(docs/guarantees.md). Output and message tests live in test_hostile_outputs.py.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import embedstore.extract as extract_module
import embedstore.store_writer as store_module  # the writer: create_store, FeatureSetWriter
from cli.embed import embed
from cli.heads import heads
from embedstore.catalog import open_catalog
from embedstore.extract import extract
from embedstore.extract_plan import ExtractSettings
from embedstore.manifest import SplitSettings, prepare_manifest
from embedstore.store import STATUS_NON_FINITE, STATUS_OK, DataWarning, FeatureStore
from embedstore.store_writer import FeatureSetWriter, create_store
from embedstore.synthetic_catalog import make_fashion_catalog
from heads.estimator import FusionHead
from heads.results import ResultsLock, read_runs
from heads.train import TrainSettings
from store_factory import IMAGE, TEXT, make_feature_store
from tests.cli_helpers import TINY, invoke as run

pytestmark = pytest.mark.usefixtures("one_thread")

C = 6  # the store: six classes, so chance is 1/6
# --jobs 1: the heads train in this process (a spawned worker pool per sweep costs seconds of torch imports; pools
# are tested in test_hostile_sweep.py and test_sweep_grid.py)
SWEEP = ["--strategies", "2A", "--fusions", "concat", "--seeds", "0", "--jobs", "1", "--max-epochs", "4",
         "--batch-size", "32", "--device", "cpu"]


def make_store(path, *, image=None):
    """Separable class-dependent features in every split; `image` replaces the image matrix."""
    return make_feature_store(path, classes=C, features={IMAGE: 16 if image is None else image, TEXT: 12},
                              provenance={IMAGE: {"parameters": 10}, TEXT: {"parameters": 5}},
                              manifest_sha256="m").path


def prepared(root, *, as_zip=False):
    info = make_fashion_catalog(root / "catalog", per_class=10, as_zip=as_zip)
    manifest = prepare_manifest(open_catalog(info.path), SplitSettings(min_items=8, items_per_class=8, train=5,
                                                                       val=1, test=2, seed=0))
    manifest.save(root / "manifest.json")
    return info, manifest, root / "manifest.json"


# ----------------------------------------------------------------------------------------------- NaN / inf


def test_the_writer_never_marks_a_non_finite_row_ok(tmp_path):
    path = tmp_path / "s.h5"
    create_store(path, ids=list("abcd"), labels=[0, 1, 0, 1], splits=["train", "val", "test", "train"],
                 classes=["x", "y"], manifest_sha256="m")
    values = np.ones((4, 3), np.float32)
    values[1, 2], values[3, 0] = np.nan, np.inf
    provenance = {"pooled": {"backbone": "b", "weights_id": "w", "preprocessing": {}}}
    with FeatureSetWriter(path, modality="image", source="b", layers={"pooled": 3}, provenance=provenance) as w:
        w.write(np.arange(4), {"pooled": values}, np.full(4, STATUS_OK))
        assert w.status.tolist() == [STATUS_OK, STATUS_NON_FINITE, STATUS_OK, STATUS_NON_FINITE]
        assert w.finish()
    with FeatureStore(path) as store:
        assert store.feature_sets["image/b/pooled"].counts["skipped: non-finite features"] == 2


def test_extraction_skips_rows_whose_features_are_not_finite(tmp_path, monkeypatch):
    _, manifest, manifest_path = prepared(tmp_path)
    real = extract_module.create_backbone

    def nan_first_row(*args, **kwargs):  # a network that gives NaN for the first item of every batch
        backbone = real(*args, **kwargs)
        backbone.register_forward_hook(lambda module, inputs, out: out.index_fill(0, torch.tensor([0]), np.nan))
        return backbone

    monkeypatch.setattr(extract_module, "create_backbone", nan_first_row)
    settings = ExtractSettings(image_backbone=None, text_backbone="tiny-bert", text_batch_size=8, progress=False)
    [report] = extract(manifest_path, tmp_path / "s.h5", settings)
    batches = -(-len(manifest.items) // 8)
    assert report.complete and report.counts["skipped: non-finite features"] == batches
    result = run(embed, ["inspect", tmp_path / "s.h5"])
    assert "non-finite features" in result.output and "status      complete" in result.output


def test_non_finite_rows_in_a_store_are_left_out_counted_and_said(tmp_path):
    store = make_store(tmp_path / "s.h5")
    with h5py.File(store, "r+") as f:  # the edit: NaN into 5 ok image rows, inf into one text row
        f[f"features/{IMAGE}"][3:8] = np.nan
        f[f"features/{TEXT}"][20, 4] = np.inf
    with FeatureStore(store) as opened, pytest.warns(DataWarning) as caught:
        data = opened.load([IMAGE, TEXT])
    assert data.non_finite == {IMAGE: 5, TEXT: 1} and data.skipped == 6 and len(data.ids) == 234
    assert np.isfinite(data.features[IMAGE]).all() and np.isfinite(data.features[TEXT]).all()
    assert any(IMAGE in str(w.message) and "5 rows" in str(w.message) for w in caught)

    result = run(embed, ["inspect", store])
    assert "DAMAGED: 5 rows" in result.output and "status      complete" not in result.output

    result = run(heads, ["sweep", store, "--out", tmp_path / "r", *SWEEP])
    assert result.exit_code == 0, result.output
    assert f"feature set {IMAGE} has 5 rows" in result.output  # said, in one line
    weights = load_file(str(tmp_path / "r" / "heads" / "2A-concat" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    rows = read_runs(tmp_path / "r")
    assert all(row["test_accuracy"] > 0.5 for row in rows)  # far above chance (1/6)
    assert rows[0]["store"]["non_finite_rows"] == {IMAGE: 5, TEXT: 1}  # and the rows record what was left out


def test_a_head_whose_loss_turns_non_finite_is_recorded_as_diverged_and_never_saved(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(240, 16)).astype(np.float32)
    image[2] = 3e38  # finite, so it is read, but its logits overflow: the loss turns NaN
    store = make_store(tmp_path / "s.h5", image=image)
    result = run(heads, ["sweep", store, "--out", tmp_path / "r", *SWEEP])
    assert result.exit_code == 0, result.output
    rows = {row["cell"]: row for row in read_runs(tmp_path / "r")}
    assert rows["2A-concat"]["diverged"] and rows["image"]["diverged"] and not rows["text"]["diverged"]
    assert rows["2A-concat"]["epochs_run"] == 1  # stopped at the end of the epoch it diverged in
    saved = {p.name for p in (tmp_path / "r" / "heads").iterdir()}
    assert saved == {"text"}  # the cells whose every head diverged save nothing


# ----------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("option, value", [("--max-epochs", "0"), ("--batch-size", "-5"), ("--lr", "-1"),
                                           ("--lr", "nan"), ("--lr", "inf"), ("--patience", "0")])
def test_sweep_numeric_options_are_checked_before_any_work(tmp_path, option, value):
    store = make_store(tmp_path / "s.h5")
    args = [a for i, a in enumerate(SWEEP) if option not in SWEEP[max(0, i - 1):i + 1]]  # without its default
    result = run(heads, ["sweep", store, "--out", tmp_path / "r", *args, option, value])
    assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("settings", [dict(lr=float("nan")), dict(lr=-1.0), dict(max_epochs=0),
                                      dict(batch_size=-5), dict(weight_decay=float("inf"))])
def test_library_callers_get_the_same_one_line_error(settings):
    with pytest.raises(ValueError, match="must be"):
        TrainSettings(**settings)


@pytest.mark.parametrize("option, value", [("--image-size", "0"), ("--batch-size", "0"),
                                           ("--text-batch-size", "0"), ("--workers", "-1")])
def test_extract_numeric_options_are_checked_before_any_work(tmp_path, option, value):
    _, _, manifest_path = prepared(tmp_path)
    args = [a for a in TINY if a not in ("--image-size", "64", "--workers", "0")]
    result = run(embed, ["extract", manifest_path, "--store", tmp_path / "s.h5", *args, option, value])
    assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s.h5").exists()
    with pytest.raises(ValueError, match="--image-size"):
        ExtractSettings(image_size=0)


# ----------------------------------------------------------------------------------------------- results folder


def test_a_second_sweep_into_a_locked_folder_refuses_in_one_line(tmp_path):
    store = make_store(tmp_path / "s.h5")
    with ResultsLock(tmp_path / "r"):  # another sweep holds the folder
        result = run(heads, ["sweep", store, "--out", tmp_path / "r", *SWEEP])
    assert result.exit_code == 2 and f"pid {os.getpid()}" in result.output and str(tmp_path / "r") in result.output
    assert len(result.output.strip().splitlines()) == 1 and read_runs(tmp_path / "r") == []
    assert run(heads, ["sweep", store, "--out", tmp_path / "r", *SWEEP]).exit_code == 0  # released


def test_two_sweeps_at_once_never_write_a_run_twice(tmp_path):
    store = make_store(tmp_path / "s.h5")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "cli.heads", "sweep", str(store), "--out", str(tmp_path / "r"),
               "--fusions", "add,average,product,concat,gated", "--strategies", "2A", "--seeds", "0,1,2",
               "--max-epochs", "30", "--device", "cpu", "--jobs", "1"]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    codes = sorted(p.returncode for p in processes)
    keys = [row["run_key"] for row in read_runs(tmp_path / "r")]
    assert len(keys) == len(set(keys)) == 21, outputs  # 5 cells + 2 baselines, 3 seeds, each once
    # the loser refused in one line, or started after the winner finished and skipped every run
    assert codes == [0, 0] or (codes == [0, 2] and any("another `heads sweep`" in o for o in outputs)), outputs


def test_a_torn_final_line_is_left_out_with_a_warning_and_repaired_by_the_next_append(tmp_path):
    store = make_store(tmp_path / "s.h5")
    assert run(heads, ["sweep", store, "--out", tmp_path / "r", *SWEEP]).exit_code == 0
    runs = tmp_path / "r" / "runs.jsonl"
    whole = runs.read_text()
    n_lines = len(whole.splitlines())
    runs.write_text(whole + whole.splitlines()[0][:997])  # a kill during a write
    with pytest.warns(DataWarning, match=f"runs.jsonl:{n_lines + 1}: torn final line"):
        assert len(read_runs(tmp_path / "r")) == n_lines
    result = run(heads, ["report", tmp_path / "r", "--out", tmp_path / "report"])
    assert result.exit_code == 0 and f"runs.jsonl:{n_lines + 1}" in result.output
    result = run(heads, ["sweep", store, "--out", tmp_path / "r", *SWEEP[:-2], "--seeds", "0,1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = runs.read_text().splitlines()
    assert runs.read_text().endswith("\n") and len(lines) == 2 * n_lines  # repaired, then the new seed's rows
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_any_other_bad_line_is_an_error_naming_file_and_line(tmp_path):
    store = make_store(tmp_path / "s.h5")
    assert run(heads, ["sweep", store, "--out", tmp_path / "r", *SWEEP]).exit_code == 0
    runs = tmp_path / "r" / "runs.jsonl"
    lines = runs.read_text().splitlines()
    runs.write_text("\n".join([lines[0], '{"run_key": "x", "cut', *lines[1:]]) + "\n")
    for args in (["report", tmp_path / "r", "--out", tmp_path / "report"], ["sweep", store, "--out", tmp_path / "r",
                                                                            *SWEEP]):
        result = run(heads, args)
        assert result.exit_code == 2 and f"{runs}:2: not a JSON row" in result.output, result.output


def test_the_head_is_saved_before_its_rows_so_a_crash_between_them_loses_nothing(tmp_path, monkeypatch):
    import heads.sweep as sweep_module

    store = make_store(tmp_path / "s.h5")
    settings = sweep_module.SweepSettings(strategies=("2A",), fusions=("concat",), seeds=(0,), baselines=False,
                                          device="cpu", train=TrainSettings(max_epochs=3))

    def crash(*args, **kwargs):
        raise RuntimeError("killed while saving the best head")

    monkeypatch.setattr(FusionHead, "save_pretrained", crash)   # the sweep saves the cell's best head with it
    with pytest.raises(RuntimeError, match="killed"):
        sweep_module.run_sweep(store, tmp_path / "r", settings, log=lambda _: None)
    assert read_runs(tmp_path / "r") == []  # no row vouches for a head that was never written
    monkeypatch.undo()
    summary = sweep_module.run_sweep(store, tmp_path / "r", settings, log=lambda _: None)
    assert summary["trained"] == 1 and (tmp_path / "r" / "heads" / "2A-concat" / "model.safetensors").exists()


def test_rows_and_reports_name_paths_relative_to_their_folder(tmp_path):
    store = make_store(tmp_path / "data" / "s.h5")
    assert run(heads, ["sweep", store, "--out", tmp_path / "r", *SWEEP]).exit_code == 0
    paths = {row["store"]["path"] for row in read_runs(tmp_path / "r")}
    assert paths == {os.path.join("..", "data", "s.h5")}
    assert run(heads, ["report", tmp_path / "r", "--out", tmp_path / "report"]).exit_code == 0
    assert str(tmp_path) not in (tmp_path / "report" / "report.md").read_text()


def test_the_report_counts_each_run_once(tmp_path):
    store = make_store(tmp_path / "s.h5")
    assert run(heads, ["sweep", store, "--out", tmp_path / "r", *SWEEP[:-4], "--seeds", "0,1",
                       "--device", "cpu"]).exit_code == 0
    runs = tmp_path / "r" / "runs.jsonl"
    runs.write_text(runs.read_text() * 2)  # what two unlocked sweeps used to leave
    assert run(heads, ["report", tmp_path / "r", "--out", tmp_path / "report"]).exit_code == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| 2A-concat | 2 |" in text and "6 repeated rows" in text


# ----------------------------------------------------------------------------------------------- stores


def test_two_creators_of_one_new_store_both_succeed_with_one_store(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    kwargs = dict(ids=["a", "b"], labels=[0, 1], splits=["train", "test"], classes=["x", "y"], manifest_sha256="m")
    real, raced = store_module.library_versions, []

    def other_process_creates_it_meanwhile():
        if not raced:
            raced.append(True)
            create_store(path, **kwargs)  # the other `embed extract` wins the race, mid-creation of ours
        return real()

    monkeypatch.setattr(store_module, "library_versions", other_process_creates_it_meanwhile)
    create_store(path, **kwargs)
    with FeatureStore(path) as store:
        assert store.ids.tolist() == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # no temporary file left behind


def test_a_moved_catalog_keeps_its_store(tmp_path):
    _, _, manifest_path = prepared(tmp_path)
    text_only = ["--image-backbone", "none", "--text-backbone", "tiny-bert", "--no-progress"]
    assert run(embed, ["extract", manifest_path, "--store", tmp_path / "s.h5", *text_only]).exit_code == 0
    shutil.move(tmp_path / "catalog", tmp_path / "moved")
    doc = json.loads(manifest_path.read_text())
    doc["catalog"]["path"] = doc["catalog"]["path"].replace(str(tmp_path / "catalog"), str(tmp_path / "moved"))
    manifest_path.write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")  # the user fixes the path
    result = run(embed, ["extract", manifest_path, "--store", tmp_path / "s.h5", *text_only])
    assert result.exit_code == 0 and "already complete" in result.output, result.output
    with h5py.File(tmp_path / "s.h5", "r+") as f:  # a store made before items_identity was recorded
        del f.attrs["items_identity"]
    result = run(embed, ["extract", manifest_path, "--store", tmp_path / "s.h5", *text_only])
    assert result.exit_code == 0 and "already complete" in result.output, result.output
    doc["items"][0]["split"] = "val" if doc["items"][0]["split"] != "val" else "test"  # other items: refused
    manifest_path.write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")
    result = run(embed, ["extract", manifest_path, "--store", tmp_path / "s.h5", *text_only])
    assert result.exit_code == 2 and "another manifest" in result.output


def bomb_png(width=20000, height=20000) -> bytes:
    """A valid PNG header of 20000 x 20000 pixels (400 M, beyond PIL's limit) with almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_an_enormous_image_is_a_counted_skip(tmp_path):
    info, manifest, manifest_path = prepared(tmp_path)
    victim = next(item for item in manifest.items if item.id != info.corrupt_image_id)
    (Path(info.path) / victim.image).write_bytes(bomb_png())
    result = run(embed, ["extract", manifest_path, "--store", tmp_path / "s.h5", *TINY, "--text-backbone", "none"])
    assert result.exit_code == 0, result.output
    assert "skipped: image too large 1" in result.output and "; complete" in result.output


def test_decoding_workers_start_from_a_forkserver_unless_main_cannot_be_reimported(monkeypatch):
    import types

    from embedstore.workers import worker_context

    assert worker_context().get_start_method() == "forkserver"  # pytest's __main__ is a file
    stdin = types.ModuleType("__main__")
    stdin.__file__, stdin.__spec__ = "<stdin>", None  # `python - < script.py`
    monkeypatch.setitem(sys.modules, "__main__", stdin)
    assert worker_context().get_start_method() == "fork"
