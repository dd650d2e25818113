"""The two image pipelines (embedstore/image_pipeline.py): "pil" transforms each image in the DataLoader
workers; "tensor" only decodes there and resizes, crops and normalizes a batch at once on the compute device.
They must agree to one intensity level, keep bad images as counted skips, record which one made a store, refuse
to mix in one feature set, and `heads predict` must compute features the way the store did. The same for the
"pad" resize (the whole photo on a white square), which is also its own feature set beside the protocol's crop."""
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


@pytest.mark.parametrize("resize", ["crop", "pad"])
def test_the_batched_transform_matches_pil_to_one_intensity_level_and_keeps_bad_images_as_skips(resize):
    files = odd_images()
    backbone = create_backbone("image", "tiny-resnet", image_size=64, image_resize=resize)
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
    if resize == "crop":
        assert (gap <= ONE_LEVEL).all(), gap
    else:
        # "pad" keeps the aspect, so its scale is the same exact ratio on both axes (80 -> 64 = 1.25), where
        # torchvision's and PIL's fixed-point weights round a rare pixel differently: two levels at most, and
        # beyond one level in about 1 pixel in 30,000 (embedstore/image_pipeline.py's docstring)
        assert (gap <= 2 * ONE_LEVEL).all(), gap
        assert ((batched - images_p).abs() > ONE_LEVEL).float().mean() < 1e-3
    assert (gap > 0).any()   # not the same code path by accident: the two resizes round differently somewhere
    if resize == "pad":   # the padding is placed identically: the white border is exactly white in both
        white = (1 - torch.tensor(MEAN)) / torch.tensor(STD)   # (3,)
        wide = list(files).index("wide.jpg")   # its row among the good images too (the corrupt one is last)
        assert torch.allclose(images_p[wide, :, :19], white[:, None, None].expand(3, 19, 64))
        assert torch.equal(batched[wide, :, :19], images_p[wide, :, :19])   # 300x120 -> 64x26 at row 19
        assert torch.equal(batched[wide, :, 45:], images_p[wide, :, 45:])


@pytest.mark.parametrize("resize, shorter", [("crop", 73), ("pad", "pad")])
def test_an_image_transforms_the_same_alone_or_in_a_batch_of_other_sizes(resize, shorter):
    files = odd_images()
    transform = BatchedImageTransform(64, shorter, MEAN, STD, torch.device("cpu"))
    backbone = create_backbone("image", "tiny-resnet", image_size=64, image_resize=resize)
    stages = image_stages(backbone, "tensor", torch.device("cpu"))
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


def test_pad_never_enlarges_past_its_square_so_the_thin_strip_is_padded_not_skipped():
    strip = encoded(Image.fromarray(np.zeros((40000, 1, 3), dtype=np.uint8)), "PNG")
    files = {"a.jpg": odd_images()["a.jpg"], "strip.png": strip}
    backbone = create_backbone("image", "tiny-resnet", image_size=64, image_resize="pad")
    pil, tensor = (image_stages(backbone, pipeline, torch.device("cpu")) for pipeline in ("pil", "tensor"))
    assert pil.resize is None and tensor.resize is None   # nothing to refuse: 64 x 64 at most
    _, images, status = batch_of(files, pil)
    _, groups, _ = batch_of(files, tensor)
    assert list(status) == [STATUS_OK, STATUS_OK]
    batched = tensor.to_device(groups, torch.device("cpu"))   # (2, 3, 64, 64): the strip a 1-px black column
    assert batched.shape == images.shape == (2, 3, 64, 64)
    assert (batched - images).abs().max() <= ONE_LEVEL


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


def extract_with(catalog, pipeline: str, name: str, resize: str = "crop") -> Path:
    store = catalog["root"] / f"{name}.h5"
    ok(embed, ["extract", catalog["manifest"], "--store", store, *TINY, "--batch-size", 7, "--workers", 0,
               "--device", "cpu", "--image-pipeline", pipeline, "--image-resize", resize, "--no-progress"])
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


@pytest.mark.parametrize("pipeline, resize", [("tensor", "crop"), ("tensor", "pad")])
def test_predict_computes_features_with_the_stores_pipeline(catalog, tmp_path, pipeline, resize):
    store = extract_with(catalog, pipeline, f"served-{pipeline}-{resize}", resize)
    results = tmp_path / "results"
    ok(heads, ["sweep", store, "--out", results, "--strategies", "image", "--seeds", 0, "--device", "cpu",
               "--max-epochs", 2, "--jobs", 1])
    head_dir = results / "heads" / "image"
    config = json.loads((head_dir / "config.json").read_text())
    (name,) = config["inputs"]
    assert name == ("image/tiny-resnet-64px-pad/pooled" if resize == "pad" else "image/tiny-resnet-64px/pooled")
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


def test_a_pad_feature_set_sits_beside_the_crop_one_and_records_its_resize(catalog):
    store = extract_with(catalog, "pil", "both")
    refused = invoke(embed, ["extract", catalog["manifest"], "--store", store, *TINY, "--text-backbone", "none",
                             "--device", "cpu", "--image-resize", "pad"])
    assert refused.exit_code == 2 and "Pass --add" in refused.output and "Traceback" not in refused.output
    output = ok(embed, ["extract", catalog["manifest"], "--store", store, *TINY, "--text-backbone", "none",
                        "--device", "cpu", "--image-resize", "pad", "--image-pipeline", "tensor", "--add"])
    assert "image/tiny-resnet-64px-pad: computed" in output
    with FeatureStore(store) as opened:
        crop, pad = (opened.feature_sets[f"image/{source}/pooled"] for source in ("tiny-resnet-64px", "tiny-resnet-64px-pad"))
        assert crop.provenance["preprocessing"]["resize"] == 73 and crop.provenance["preprocessing"]["crop"] == "center"
        assert pad.provenance["preprocessing"]["resize"] == "pad" and pad.provenance["preprocessing"]["pipeline"] == "tensor"
        assert "native_image_size" not in crop.provenance   # tiny-resnet's is the protocol's 224
        x, y = (opened.load([info.name]).features[info.name] for info in (crop, pad))
    assert x.shape == y.shape and not np.allclose(x, y, atol=1e-3)   # other pixels, other features


def test_resize_option_is_checked_and_names_the_source():
    from embedstore.extract_plan import ExtractSettings, image_source_name

    assert image_source_name("efficientnet_lite1", 224) == "efficientnet_lite1"
    assert image_source_name("efficientnet_lite1", 240, "pad") == "efficientnet_lite1-240px-pad"
    assert image_source_name("efficientnet_lite0", 224, "pad") == "efficientnet_lite0-pad"
    with pytest.raises(ValueError, match="unknown --image-resize 'fit'; use one of crop, pad"):
        ExtractSettings(image_resize="fit")
    with pytest.raises(ValueError, match="--image-resize pad applies to an --image-backbone"):
        ExtractSettings(image_backbone=None, image_resize="pad")
    result = invoke(embed, ["extract", "manifest.json", "--store", "s.h5", "--image-resize", "stretch"])
    assert result.exit_code == 2 and "'stretch' is not one of 'crop', 'pad'" in result.output


def test_a_backbones_native_size_is_recorded_beside_the_size_it_ran_at(catalog, tmp_path):
    """EfficientNet-Lite1's weights were trained at 240 px; a store made at 64 px says so. (Random Lite1 weights
    from a file, in timm's naming: nothing to install.)"""
    import timm

    from embedstore.extract import extract
    from embedstore.extract_plan import ExtractSettings

    weights = tmp_path / "lite1.pth"
    torch.save(timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict(), weights)
    store = tmp_path / "lite1.h5"
    extract(catalog["manifest"], store, ExtractSettings(image_backbone="efficientnet_lite1", image_weights=str(weights),
                                                        text_backbone=None, image_size=64, workers=0, progress=False,
                                                        device="cpu"))
    with FeatureStore(store) as opened:
        info = opened.feature_sets["image/efficientnet_lite1-64px/pooled"]
        assert info.provenance["native_image_size"] == 240 and info.provenance["preprocessing"]["image_size"] == 64
        assert info.complete
