"""Issue #10, continued: outputs checked before work, every OSError in one line naming the path, no partial
files, no NaN in predictions, and clear messages for a file that is no store, a non-UTF-8 CSV and a damaged head."""
import csv
import errno
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import embedstore.outputs as outputs_module
import embedstore.store_writer as store_module  # the writer: create_store, FeatureSetWriter
import pipelines.predict as predict_module
from cli.embed import embed
from cli.heads import heads
from embedstore.manifest import Manifest
from embedstore.synthetic_catalog import make_fashion_catalog
from tests.cli_helpers import TINY, invoke as run
from tests.test_hostile import bomb_png

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A catalog, its manifest, a store of the tiny backbones, a 2A-concat head and a CSV of three products."""
    root = tmp_path_factory.mktemp("hostile")
    info = make_fashion_catalog(root / "catalog", per_class=16, image_px=(48, 64))
    manifest, store, results = root / "manifest.json", root / "store.h5", root / "results"
    for args in (["prepare", info.path, "--out", manifest, "--min-items", 12, "--items-per-class", 12, "--train", 6,
                  "--val", 3, "--test", 3], ["extract", manifest, "--store", store, *TINY]):
        assert run(embed, args).exit_code == 0
    result = run(heads, ["sweep", store, "--out", results, "--strategies", "2A", "--fusions", "concat", "--seeds", 0,
                         "--max-epochs", 3, "--no-baselines", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    images = sorted((Path(info.path) / "images").glob("*.jpg"))
    rows = [{"id": "a", "image": str(images[0]), "title": "blue cotton shirt"},
            {"id": "c", "image": str(images[1]), "title": "black running shoes"}]
    write_csv(root / "products.csv", rows)
    return {"root": root, "store": store, "results": results, "head": results / "heads" / "2A-concat",
            "csv": root / "products.csv", "manifest": manifest, "rows": rows}


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "title"])
        writer.writeheader()
        writer.writerows(rows)


def predict(world, out, *extra, head=None, inputs=None):
    return run(heads, ["predict", head or world["head"], inputs or world["csv"], "--out", out, "--workers", 0,
                       *extra])


# ----------------------------------------------------------------------------------------------- outputs


def test_sweep_into_an_existing_file_is_one_line(world, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    line = one_line(run(heads, ["sweep", world["store"], "--out", tmp_path / "taken", "--strategies", "2A"]))
    assert str(tmp_path / "taken") in line and "not a folder" in line


def test_predict_into_a_folder_is_refused_before_any_work(world, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "load_sources", lambda *a: pytest.fail("worked before checking --out"))
    line = one_line(predict(world, tmp_path))
    assert str(tmp_path) in line and "is a folder" in line


def test_outputs_into_an_unwritable_folder_are_refused_before_any_work(world, tmp_path, monkeypatch):
    # tests run as root, for whom every folder is writable: the check is made to see what a user would
    monkeypatch.setattr(outputs_module.os, "access", lambda path, mode: not mode & os.W_OK)
    monkeypatch.setattr(predict_module, "load_sources", lambda *a: pytest.fail("worked before checking --out"))
    for group, args in ((heads, ["predict", world["head"], world["csv"], "--out", tmp_path / "p.csv"]),
                        (heads, ["sweep", world["store"], "--out", tmp_path / "r"]),
                        (heads, ["report", world["results"], "--out", tmp_path / "report"])):
        line = one_line(run(group, args))
        assert "Permission denied" in line and str(tmp_path) in line
    assert list(tmp_path.iterdir()) == []


def test_resuming_an_unwritable_store_is_one_line(world, tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(store_module.os, "access",
                        lambda path, mode: real(path, mode) and not (mode & os.W_OK and str(path).endswith(".h5")))
    # a finished store needs no write: said at once, before any backbone loads
    done = run(embed, ["extract", world["manifest"], "--store", world["store"], *TINY])
    assert done.exit_code == 0 and "already complete" in done.output, done.output
    # a feature set still to compute (another image size) needs one: refused in one line
    line = one_line(run(embed, ["extract", world["manifest"], "--store", world["store"], *TINY, "--image-size", "48",
                                "--add"]))
    assert "cannot write to the store" in line and str(world["store"]) in line


def test_a_full_disk_during_predict_is_one_line_and_leaves_no_partial_file(world, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predict_module, "_write_rows", full)   # private: the one place predict's rows reach the disk
    line = one_line(predict(world, tmp_path / "p.csv"))
    assert "No space left on device" in line
    assert list(tmp_path.iterdir()) == []


def test_prepare_into_a_folder_is_refused_before_reading_the_catalog(tmp_path):
    line = one_line(run(embed, ["prepare", tmp_path / "no-catalog-needed", "--out", tmp_path]))
    assert "is a folder" in line and str(tmp_path) in line


def test_a_full_disk_during_extraction_is_one_line_and_the_rerun_resumes(world, tmp_path, monkeypatch):
    real, calls = store_module._write_rows, []   # private: the one place the writer's rows reach the disk

    def full_after_two_batches(*args):
        calls.append(1)
        if len(calls) > 4:  # values + status of two batches, then the disk is full
            raise OSError(errno.ENOSPC, "Unable to write data (No space left on device)")
        return real(*args)

    monkeypatch.setattr(store_module, "_write_rows", full_after_two_batches)
    store = tmp_path / "s.h5"
    line = one_line(run(embed, ["extract", world["manifest"], "--store", store, *TINY, "--batch-size", 4]))
    assert "No space left on device" in line and str(store) in line and "resumes" in line
    monkeypatch.undo()
    result = run(embed, ["extract", world["manifest"], "--store", store, *TINY])
    n_items = len(Manifest.load(world["manifest"]).items)
    assert result.exit_code == 0 and f"image/tiny-resnet-64px: computed {n_items - 8} rows" in result.output


def test_one_line_errors_name_the_path_of_any_os_error():
    from cli.common import one_line_errors

    @one_line_errors
    def command(error):
        raise error

    for error in (PermissionError(13, "Permission denied", "/x/runs.jsonl"), IsADirectoryError(21, "Is a dir", "/x"),
                  FileExistsError(17, "File exists", "/x/out"), OSError(errno.ENOSPC, "No space left", "/x/s.h5")):
        with pytest.raises(Exception) as caught:
            command(error)
        assert caught.value.exit_code == 2 and caught.value.message == f"{error.strerror}: {error.filename}"


# ----------------------------------------------------------------------------------------------- predict


def test_an_enormous_image_in_predict_is_a_reason_not_a_traceback(world, tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    bomb = {"id": "bomb", "image": str(tmp_path / "bomb.png"), "title": "red leather watch"}
    write_csv(tmp_path / "in.csv", [world["rows"][0], bomb, world["rows"][1]])
    result = predict(world, tmp_path / "p.csv", inputs=tmp_path / "in.csv")
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in csv.DictReader(open(tmp_path / "p.csv"))}
    assert rows["bomb"]["reason"] == "image too large" and rows["a"]["label_1"] and rows["c"]["label_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png", "in.csv", "p.csv"]


def test_predict_never_writes_nan(world, tmp_path):
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text((world["head"] / "config.json").read_text())
    weights = load_file(str(world["head"] / "model.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(head / "model.safetensors"))
    result = predict(world, tmp_path / "p.csv", head=head)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "p.csv").read_text()
    assert "nan" not in text.lower() and text.count("non-finite features") == 2


# ----------------------------------------------------------------------------------------------- messages


def test_an_hdf5_file_without_the_store_tables_is_named(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["format"] = "embedstore-feature-store"
        f.create_dataset("classes", data=np.array([b"a"]))
    line = one_line(run(embed, ["inspect", tmp_path / "x.h5"]))
    assert str(tmp_path / "x.h5") in line and "lacks /items/id" in line and "/features" in line


def test_a_csv_that_is_not_utf8_is_named(world, tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("id,image,title\n1,x.jpg,caf\xe9 cr\xe8me\n".encode("latin-1"))
    line = one_line(run(heads, ["predict", world["head"], bad, "--out", tmp_path / "p.csv"]))
    assert str(bad) in line and "not UTF-8" in line


def test_a_truncated_head_is_named(world, tmp_path):
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text((world["head"] / "config.json").read_text())
    data = (world["head"] / "model.safetensors").read_bytes()
    (head / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = one_line(predict(world, tmp_path / "p.csv", head=head))
    assert str(head / "model.safetensors") in line and "truncated or corrupt" in line and "again" in line
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.csv.partial").exists()
