"""The two image pipelines (embedstore/image_pipeline.py): "pil" transforms each image in the DataLoader
workers; "tensor" only decodes there and resizes, crops and normalizes a batch at once on the compute device.
They must agree to one intensity level, keep bad images as counted skips, record which one made a store, refuse
to mix in one feature set, and `heads predict` must compute features the way the store did."""
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cli.embed import embed
from cli.heads import heads
from embedstore.backbones import create_backbone
from embedstore.images import image_stages, resized_pixels
from embedstore.image_pipeline import BatchedImageTransform, recorded_pipeline, resolve_pipeline
from embedstore.store import STATUS_IMAGE_TOO_LARGE, STATUS_OK, STATUS_PENDING, STATUS_UNREADABLE_IMAGE, FeatureStore
from embedstore.synthetic_catalog import make_fashion_catalog
from tests.cli_helpers import TINY, invoke, ok

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ONE_LEVEL = 1 / 255 / min(STD) + 1e-6   # one intensity level after normalization: the pipelines' promised gap


class Files:
    """A catalog-like reader over in-memory image files (what ImageRows needs of a catalog)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def read_image_bytes(self, ref: str) -> bytes:
        return self.files[ref]


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def odd_images() -> dict[str, bytes]:
    """Photos of several sizes and modes, as the catalog holds them (RGB 60x80, grayscale, RGBA PNG, wide and
    tall ones, one smaller than the crop), plus one corrupt file."""
    rng = np.random.default_rng(0)

    def noise(w, h, channels=3):
        return rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)

    return {
        "a.jpg": encoded(Image.fromarray(noise(60, 80))),
        "b.jpg": encoded(Image.fromarray(noise(60, 80))),
        "gray.jpg": encoded(Image.fromarray(noise(60, 80, 1)[..., 0], mode="L")),
        "rgba.png": encoded(Image.fromarray(noise(75, 50, 4), mode="RGBA"), "PNG"),
        "wide.jpg": encoded(Image.fromarray(noise(300, 120))),
        "tiny.jpg": encoded(Image.fromarray(noise(20, 30))),
        "corrupt.jpg": b"\xff\xd8\xff not a jpeg",
    }


def batch_of(files: dict[str, bytes], stages):
    refs = list(files)
    dataset = stages.rows(Files(files), refs, np.arange(len(refs)))
    return stages.collate([dataset[i] for i in range(len(refs))])


def test_the_batched_transform_matches_pil_to_one_intensity_level_and_keeps_bad_images_as_skips():
    files = odd_images()
    backbone = create_backbone("image", "tiny-resnet", image_size=64)
    pil, tensor = image_stages(backbone, "pil", torch.device("cpu")), image_stages(backbone, "tensor", torch.device("cpu"))
    rows_p, images_p, status_p = batch_of(files, pil)
    rows_t, groups, status_t = batch_of(files, tensor)
    assert list(rows_p) == list(rows_t) and list(status_p) == list(status_t)
    assert status_t[list(files).index("corrupt.jpg")] == STATUS_UNREADABLE_IMAGE
    assert len(groups) == 4   # the three 60x80 photos (two RGB, the grayscale one) share a group; the others are alone
    batched = tensor.to_device(groups, torch.device("cpu"))              # (6, 3, 64, 64)
    assert batched.shape == images_p.shape == (6, 3, 64, 64)
    assert batched.is_contiguous(memory_format=torch.channels_last)
    gap = (batched - images_p).abs().amax(dim=(1, 2, 3))                 # (6,), per image
    assert (gap <= ONE_LEVEL).all(), gap
    assert (gap > 0).any()   # not the same code path by accident: the two resizes round differently somewhere


def test_an_image_transforms_the_same_alone_or_in_a_batch_of_other_sizes():
    files = odd_images()
    transform = BatchedImageTransform(64, 73, MEAN, STD, torch.device("cpu"))
    stages = image_stages(create_backbone("image", "tiny-resnet", image_size=64), "tensor", torch.device("cpu"))
    _, groups, status = batch_of(files, stages)
    together = transform(groups)
    good = [name for name, code in zip(files, status) if code == STATUS_OK]
    for i, name in enumerate(good):
        _, alone, _ = batch_of({name: files[name]}, stages)
        assert torch.equal(transform(alone)[0], together[i]), name


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_a_thin_strip_that_would_explode_when_resized_is_a_counted_skip(pipeline):
    # 40,000 pixels on disk; 73 x 2,920,000 once its shorter side is resized to 73 (64 px crops): past PIL's limit
    strip = encoded(Image.fromarray(np.zeros((40000, 1, 3), dtype=np.uint8)), "PNG")
    files = {"a.jpg": odd_images()["a.jpg"], "strip.png": strip}
    stages = image_stages(create_backbone("image", "tiny-resnet", image_size=64), pipeline, torch.device("cpu"))
    assert stages.resize == 73
    _, images, status = batch_of(files, stages)
    assert list(status) == [STATUS_OK, STATUS_IMAGE_TOO_LARGE]
    assert stages.to_device(images, torch.device("cpu")).shape == (1, 3, 64, 64)
    assert resized_pixels((1, 40000), 73) == 73 * 2_920_000 and resized_pixels((60, 80), 256) == 256 * 341


def test_pipeline_choice_and_its_record():
    assert resolve_pipeline("auto", torch.device("cpu")) == "pil"
    assert resolve_pipeline(None, torch.device("cuda")) == "tensor"
    assert resolve_pipeline("tensor", torch.device("cpu")) == "tensor"
    with pytest.raises(ValueError, match="unknown image pipeline 'gpu'"):
        resolve_pipeline("gpu", torch.device("cpu"))
    assert recorded_pipeline({"image_size": 224}) == "pil" and recorded_pipeline(None) == "pil"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    info = make_fashion_catalog(root / "catalog", per_class=12, image_px=(48, 64))
    # other sizes and modes among the generated photos: a batch then holds several size groups
    images = Path(info.path) / "images"
    photos = sorted(p for p in images.glob("*.jpg") if p.stem != info.corrupt_image_id)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(90, 70), dtype=np.uint8), mode="L").save(photos[0], format="JPEG")
    Image.fromarray(rng.integers(0, 256, size=(40, 100, 4), dtype=np.uint8), mode="RGBA").save(photos[1], format="PNG")
    manifest = root / "manifest.json"
    ok(embed, ["prepare", info.path, "--out", manifest, "--min-items", 10, "--items-per-class", 10,
               "--train", 6, "--val", 2, "--test", 2])
    return {"root": root, "info": info, "manifest": manifest}


def extract_with(catalog, pipeline: str, name: str) -> Path:
    store = catalog["root"] / f"{name}.h5"
    ok(embed, ["extract", catalog["manifest"], "--store", store, *TINY, "--batch-size", 7, "--workers", 0,
               "--device", "cpu", "--image-pipeline", pipeline, "--no-progress"])
    return store


def test_a_tensor_pipeline_store_records_its_pipeline_and_stays_close_to_pil(catalog):
    pil, tensor = extract_with(catalog, "pil", "pil"), extract_with(catalog, "tensor", "tensor")
    with FeatureStore(pil) as a, FeatureStore(tensor) as b:
        (name,) = [n for n in a.feature_sets if n.startswith("image/")]
        assert "pipeline" not in a.feature_sets[name].provenance["preprocessing"]     # as every older store
        assert b.feature_sets[name].provenance["preprocessing"]["pipeline"] == "tensor"
        assert np.array_equal(a.status(name), b.status(name))                      # the corrupt photo skipped in both
        x, y = a.load([name]).features[name], b.load([name]).features[name]       # (n_ok, D)
    # the tiny random backbone magnifies a one-level pixel gap little: features agree to 2 % of their scale
    assert np.abs(x - y).max() <= 0.02 * np.abs(x).max()
    assert not np.array_equal(x, y)


def test_one_feature_set_never_mixes_pipelines_and_auto_resumes_with_the_one_it_began_with(catalog):
    store = extract_with(catalog, "tensor", "mixed")   # as a run begun on a GPU ("auto" there) would make it
    with FeatureStore(store) as opened:
        (name,) = [n for n in opened.feature_sets if n.startswith("image/")]
        status = opened.status(name).copy()
    with h5py.File(store, "r+") as f:   # the state a kill leaves: the last rows still pending
        group = f[f"features/{name.rsplit('/', 1)[0]}"]
        group["status"][-5:] = STATUS_PENDING
        for node in (group, group["pooled"]):
            node.attrs["complete"] = False
    # "auto" on this CPU would pick "pil", but resuming keeps the pipeline the feature set began with
    output = ok(embed, ["extract", catalog["manifest"], "--store", store, *TINY, "--workers", 0, "--device", "cpu",
                        "--no-progress"])
    assert f"{name.rsplit('/', 1)[0]}: computed 5 rows" in output, output
    with FeatureStore(store) as opened:
        assert np.array_equal(opened.status(name), status)
        assert opened.feature_sets[name].provenance["preprocessing"]["pipeline"] == "tensor"
    result = invoke(embed, ["extract", catalog["manifest"], "--store", store, *TINY, "--workers", 0,
                            "--device", "cpu", "--image-pipeline", "pil", "--no-progress"])
    assert result.exit_code != 0
    assert "with another preprocessing" in result.output and "refusing to mix them" in result.output
    assert "Traceback" not in result.output


def test_predict_computes_features_with_the_stores_pipeline(catalog, tmp_path):
    store = extract_with(catalog, "tensor", "served")
    results = tmp_path / "results"
    ok(heads, ["sweep", store, "--out", results, "--strategies", "image", "--seeds", 0, "--device", "cpu",
               "--max-epochs", 2])
    head_dir = results / "heads" / "image"
    config = json.loads((head_dir / "config.json").read_text())
    (name,) = config["inputs"]
    out = tmp_path / "pred.csv"
    ok(heads, ["predict", head_dir, catalog["info"].path, "--out", out, "--device", "cpu", "--workers", 0,
               "--batch-size", 5, "--top-k", 1])
    from tests.test_heads_predict import read_predictions, store_probabilities

    _, predictions = read_predictions(out)
    expected = store_probabilities(store, head_dir)
    classes = config["classes"]
    for item_id, p in expected.items():
        row = predictions[item_id]
        assert row["label_1"] == classes[int(p.argmax())]
        assert float(row["probability_1"]) == pytest.approx(p.max(), abs=1e-4)
