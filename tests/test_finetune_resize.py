"""`embed finetune --image-resize pad` (FinetuneSettings.image_resize): S1/S2 image modules train over the store's
padded pooled set, S3 trains on padded images, the module records the mode and loads (and extracts) with it;
modules and checkpoints saved before the setting existed read as "crop"; a text module refuses "pad" in one line.
Tiny random backbones (tiny-resnet at 64 px, tiny-bert) on a generated catalog."""
import json
from dataclasses import asdict

import pytest

import embedstore.finetune as finetune_module
from cli.embed import embed
from embedstore.cross_fit import fold_key
from embedstore.extract import extract
from embedstore.extract_plan import ExtractSettings
from embedstore.fingerprint import fingerprint
from embedstore.finetune import FinetuneSettings, finetune
from embedstore.modules import load_module
from embedstore.preprocess import PadToSquare
from embedstore.store import FeatureStore
from embedstore.synthetic_catalog import make_fashion_catalog
from tests.cli_helpers import TINY, invoke, ok

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A manifest and a store holding only the tiny backbones' "crop" pooled features."""
    root = tmp_path_factory.mktemp("resize")
    info = make_fashion_catalog(root / "catalog", per_class=12, image_px=(48, 64))
    manifest, store = root / "manifest.json", root / "store.h5"
    ok(embed, ["prepare", info.path, "--out", manifest, "--min-items", 10, "--items-per-class", 10,
               "--train", 6, "--val", 2, "--test", 2])
    ok(embed, ["extract", manifest, "--store", store, *TINY])
    return {"manifest": manifest, "store": store}


def settings(**options) -> FinetuneSettings:
    base = dict(modality="image", strategy=2, backbone="tiny-resnet", image_size=64, lr=1e-2, max_epochs=2,
                patience=10, seed=0, device="cpu", workers=0, progress=False)
    return FinetuneSettings(**{**base, **options})


def test_s2_pad_reads_the_padded_pooled_set_and_loads_and_extracts_padded(world, tmp_path):
    store = tmp_path / "store.h5"
    store.write_bytes(world["store"].read_bytes())
    with pytest.raises(ValueError, match="holds no pooled image features of tiny-resnet"):
        finetune(world["manifest"], tmp_path / "early", settings(image_resize="pad"), store_path=store)
    ok(embed, ["extract", world["manifest"], "--store", store, "--add", "--image-resize", "pad", "--text-backbone",
               "none", *TINY[:4], *TINY[6:]])
    out = tmp_path / "image-s2-pad"
    result = finetune(world["manifest"], out, settings(image_resize="pad"), store_path=store)
    assert result.metrics["items"]["train"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"]["build"]["image_resize"] == "pad"
    assert config["backbone"]["preprocessing"]["resize"] == "pad" and config["settings"]["image_resize"] == "pad"
    module, _ = load_module(out)
    assert module.backbone.resize == "pad" and module.backbone.preprocessing["resize"] == "pad"
    # extraction of the module: its outputs made from the padded pooled features (no backbone pass)
    settings_ = ExtractSettings(image_backbone=None, text_backbone=None, image_module=str(out), workers=0,
                                progress=False)
    (report,) = extract(world["manifest"], store, settings_)
    with FeatureStore(store) as opened:
        provenance = opened.feature_sets[f"{report.name}/dense"].provenance
    assert provenance["preprocessing"]["resize"] == "pad"


def test_s3_pad_trains_on_padded_images_and_an_old_checkpoint_resumes(world, tmp_path, monkeypatch):
    seen = []
    real_fit = finetune_module.fit

    def spy(model, data, *args, **kwargs):
        seen.append(data.transforms[True])
        return real_fit(model, data, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "fit", spy)
    out = tmp_path / "image-s3-pad"
    finetune(world["manifest"], out, settings(strategy=3, image_resize="pad", max_epochs=1, batch_size=8))
    assert any(isinstance(step, PadToSquare) for step in seen[0].transforms)
    assert load_module(out)[0].backbone.resize == "pad"

    # a "crop" S3 checkpoint written before image_resize existed resumes (a missing key reads as its default)
    crop = tmp_path / "image-s3-crop"
    finetune(world["manifest"], crop, settings(strategy=3, max_epochs=1, batch_size=8))
    state = crop / "checkpoint.json"
    record = json.loads(state.read_text())
    del record["settings"]["image_resize"]
    state.write_text(json.dumps(record))
    again = finetune(world["manifest"], crop, settings(strategy=3, max_epochs=2, batch_size=8))
    assert again.metrics["resumed_from_epoch"] == 1
    with pytest.raises(ValueError, match="checkpoint made with image_resize='crop', not 'pad'"):
        finetune(world["manifest"], crop, settings(strategy=3, max_epochs=3, batch_size=8, image_resize="pad"))


def test_a_module_saved_before_the_setting_loads_as_crop(world, tmp_path):
    out = tmp_path / "image-s1"
    finetune(world["manifest"], out, settings(strategy=1), store_path=world["store"])
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"]["build"]["image_resize"] == "crop"
    del config["backbone"]["build"]["image_resize"]
    (out / "config.json").write_text(json.dumps(config))
    module, _ = load_module(out)
    assert module.backbone.resize == "crop" and module.backbone.preprocessing["crop"] == "center"


def test_fold_keys_of_crop_modules_are_the_ones_written_before_the_setting():
    """Finished folds of an existing cross-fitted module stay finished: "crop" leaves the key as it was."""
    s = settings(cross_fit=2)
    before = {k: v for k, v in asdict(s).items() if k not in ("device", "progress", "workers", "image_resize")}
    expected = fingerprint({"settings": before, "manifest_sha256": "m", "fold": 0, "held_out": ["a"]})
    assert fold_key(s, "m", {"a": 0, "b": 1}, 0) == expected
    assert fold_key(settings(cross_fit=2, image_resize="pad"), "m", {"a": 0, "b": 1}, 0) != expected


def test_a_text_module_with_pad_is_a_one_line_error(world, tmp_path):
    result = invoke(embed, ["finetune", world["manifest"], "--modality", "text", "--strategy", "2", "--backbone",
                            "tiny-bert", "--store", world["store"], "--out", tmp_path / "t", "--image-resize", "pad"])
    assert result.exit_code == 2 and "applies to image modules" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    with pytest.raises(ValueError, match="unknown --image-resize 'squash'"):
        settings(image_resize="squash").resolved()
