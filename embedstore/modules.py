"""Image and text modules with the paper's three transfer strategies, saved as safetensors + JSON.

A module = backbone -> pooled feature (D) -> middle dense D->500 -> ReLU -> Dropout -> classifier 500->C.
- S1: backbone frozen; only a classifier D->C on the pooled feature (no middle layer).
- S2: backbone frozen; the middle layer and the classifier are trained.
- S3: the S2 architecture with every weight trained.

The trainable part of S1/S2 is `ModuleHead`, which runs on pooled features, so S1/S2 train and run over the
store's cached features without the backbone (finetune.py) and give the same outputs as through it.

Saved with the model-folder convention (embedstore/model_folder.py, kind "module"): `model.safetensors` +
`config.json`, written atomically, never pickled. S1/S2 save the head only and name
their backbone (build arguments + weights_id); loading rebuilds it and refuses other weights. A backbone with
random weights ("random-init") has no file to be rebuilt from, so its weights travel inside the module.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from embedstore.backbone_base import RANDOM_INIT, Backbone
from embedstore.backbones import create_backbone
from embedstore.defaults import MIDDLE_DIM  # the paper's middle layer: module feature "A" / dense
from embedstore.image_pipeline import backbone_preprocessing
from embedstore.model_folder import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, read_config, save_pretrained

STRATEGIES = (1, 2, 3)
MODULE_KIND = "module"
LAYERS = ("dense", "classifier")


def check_strategy(strategy) -> int:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown transfer strategy {strategy!r}; use 1 (frozen backbone, classifier only), "
                         "2 (frozen backbone, middle layer + classifier) or 3 (everything trained)")
    return int(strategy)


class ModuleHead(nn.Module):
    """pooled (B, D) -> [dense D->500 -> ReLU -> Dropout] -> classifier -> logits (B, C). S1 has no middle layer."""

    def __init__(self, feature_dim: int, n_classes: int | None, *, strategy: int, dropout: float = 0.3,
                 middle_dim: int = MIDDLE_DIM):
        """n_classes=None (S2/S3 only): the middle layer without a classifier, for a model that fuses the
        500-d layer (strategy 3-A, heads/end_to_end.py); a classifier nobody uses would get no gradient."""
        super().__init__()
        self.strategy = check_strategy(strategy)
        if self.strategy == 1:
            if n_classes is None:
                raise ValueError("an S1 head is only a classifier: give n_classes")
            self.dense, self.dropout = None, None
            self.classifier = nn.Linear(feature_dim, n_classes)
        else:
            self.dense, self.dropout = nn.Linear(feature_dim, middle_dim), nn.Dropout(dropout)
            self.classifier = None if n_classes is None else nn.Linear(middle_dim, n_classes)

    @property
    def layers(self) -> dict[str, int]:
        """The module-feature layers this head produces and their widths."""
        widths = {} if self.classifier is None else {"classifier": self.classifier.out_features}
        if self.dense is not None:
            widths = {"dense": self.dense.out_features, **widths}
        return widths

    def forward_features(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"dense": (B, 500) after ReLU (not for S1), "classifier": (B, C) logits (unless there is none)}."""
        if self.dense is None:
            return {"classifier": self.classifier(pooled)}
        dense = torch.relu(self.dense(pooled))  # (B, 500): feature "A"
        if self.classifier is None:
            return {"dense": dense}
        return {"dense": dense, "classifier": self.classifier(self.dropout(dense))}  # (B, C): feature "B"

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.forward_features(pooled)["classifier"]


class TransferModule(nn.Module):
    """A backbone and its head; S1/S2 keep the backbone frozen (no gradients, always in eval mode)."""

    def __init__(self, backbone: Backbone, head: ModuleHead, *, build: dict | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.strategy, self.modality = head.strategy, backbone.modality
        # How to rebuild the backbone: the create_backbone arguments (name as passed, weights path, image size).
        self.build = dict(build or {"name": backbone.name, "weights": None,
                                    "image_size": getattr(backbone, "image_size", None)})
        if backbone.modality == "image":
            self.build.setdefault("image_resize", backbone.resize)
        self.frozen = self.strategy in (1, 2)
        if self.frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            # A frozen backbone stays in eval mode: batch-norm statistics and dropout must not move either.
            self.backbone.eval()
        return self

    def forward_pooled(self, inputs) -> torch.Tensor:
        """images (B, 3, H, W), or a dict of (B, T) token tensors -> pooled (B, D)."""
        if isinstance(inputs, dict):
            pooled = self.backbone(**inputs)
        else:
            pooled = self.backbone(inputs)
        return pooled.float()

    def forward_features(self, inputs) -> dict[str, torch.Tensor]:
        """{"pooled": (B, D), "dense": (B, 500) (S2/S3), "classifier": (B, C)}."""
        pooled = self.forward_pooled(inputs)
        return {"pooled": pooled, **self.head.forward_features(pooled)}

    def forward(self, inputs) -> torch.Tensor:
        return self.head(self.forward_pooled(inputs))

    def trainable_module(self) -> nn.Module:
        """What an optimizer trains: the head for S1/S2, everything for S3."""
        return self.head if self.frozen else self

    def parameter_counts(self) -> dict[str, int]:
        head = sum(p.numel() for p in self.head.parameters())
        backbone = sum(p.numel() for p in self.backbone.parameters())
        if self.frozen:
            return {"trainable": head, "non_trainable": backbone, "total": head + backbone}
        return {"trainable": head + backbone, "non_trainable": 0, "total": head + backbone}

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors a saved module holds: the head, plus the backbone for S3 or a random backbone."""
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if not self.frozen or self.backbone.weights_id == RANDOM_INIT:
            state.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        return state

    def describe(self) -> dict:
        """The module's own identity (what config.json records besides training settings and metrics)."""
        return {
            "modality": self.modality,
            "strategy": self.strategy, "feature_dim": self.backbone.feature_dim,
            "middle_dim": None if self.head.dense is None else self.head.dense.out_features,
            "n_classes": self.head.classifier.out_features,
            "dropout": None if self.head.dropout is None else self.head.dropout.p,
            "backbone": {"name": self.backbone.name, "weights_id": self.backbone.weights_id,
                         "preprocessing": self.backbone.preprocessing, "build": self.build,
                         "parameters": sum(p.numel() for p in self.backbone.parameters())},
            "parameters": self.parameter_counts(),
        }

    def save(self, folder: str | os.PathLike, *, classes: list[str], manifest_sha256: str,
             extra: dict | None = None, extra_files: dict[str, str] | None = None) -> Path:
        """Write the module folder (model.safetensors + config.json, atomically); `extra` adds e.g. settings and
        metrics to config.json, `extra_files` whole files (name -> text, e.g. metrics.json)."""
        if len(classes) != self.head.classifier.out_features:
            raise ValueError(f"{len(classes)} class names for a module with {self.head.classifier.out_features} outputs")
        tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
                   for k, v in self.saved_state().items()}
        config = {**self.describe(), "classes": list(classes), "manifest_sha256": manifest_sha256,
                  "backbone_weights_in_file": any(k.startswith("backbone.") for k in tensors), **(extra or {})}
        config = json.loads(json.dumps(config, default=_jsonable))
        return save_pretrained(folder, tensors, config, kind=MODULE_KIND, extra_files=extra_files)


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def build_module(modality: str, strategy: int, n_classes: int, *, backbone: Backbone | None = None,
                 name: str | None = None, weights: str | None = None, image_size: int = 224,
                 dropout: float = 0.3, pretrained: bool = True, image_resize: str | None = None) -> TransferModule:
    """A fresh module: the given backbone (or one created by name) and a newly initialised head.

    image_resize (images): "crop" or "pad" (embedstore/preprocess.py), recorded in the build so that loading
    rebuilds the same preprocessing; a given backbone is switched to it. None: "crop", or a given backbone's own."""
    build = {"name": name, "weights": str(Path(weights).resolve()) if weights else None,
             "image_size": image_size if modality == "image" else None}
    if modality != "image" and image_resize not in (None, "crop"):
        raise ValueError(f"image_resize {image_resize!r} applies to image modules, not {modality} ones")
    if backbone is None:
        if not name:
            raise ValueError("build_module needs a backbone or a backbone name")
        options = {"image_size": image_size, "image_resize": image_resize or "crop"} if modality == "image" else {}
        backbone = create_backbone(modality, name, weights=weights, pretrained=pretrained, **options)
    elif name is None:
        build["name"] = backbone.name
    if backbone.modality != modality:
        raise ValueError(f"backbone {backbone.name!r} is a {backbone.modality} backbone, not {modality}")
    if modality == "image":
        if image_resize is not None and image_resize != backbone.resize:
            backbone.use_resize(image_resize)
        build["image_resize"] = backbone.resize  # absent from modules saved before "pad": those read as "crop"
    head = ModuleHead(backbone.feature_dim, n_classes, strategy=strategy, dropout=dropout)
    return TransferModule(backbone, head, build=build)


def read_module_config(folder: str | os.PathLike) -> dict:
    """config.json of a saved module (one-line FileNotFoundError / ValueError when the folder is none)."""
    try:
        return read_config(folder, kind=MODULE_KIND)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; train a module with `embed finetune`") from None


def module_id(folder: str | os.PathLike) -> str:
    """Short content hash of a saved module: its weights file and the config's identity (not its metrics)."""
    folder, config = Path(folder), read_module_config(folder)
    digest = hashlib.sha256()
    with open(folder / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    identity = {key: config.get(key) for key in ("modality", "strategy", "classes", "manifest_sha256")}
    identity["backbone"] = {k: config["backbone"].get(k) for k in ("name", "weights_id", "preprocessing")}
    if config.get("cross_fit"):  # its training rows' features come from its fold modules (cross_fit.py)
        record = config["cross_fit"]
        identity["cross_fit"] = {"k": record["k"], "fold_module_ids": record["fold_module_ids"],
                                 "folds_sha256": hashlib.sha256(json.dumps(record["folds"], sort_keys=True)
                                                                .encode()).hexdigest()}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def config_sha256(folder: str | os.PathLike) -> str:
    return hashlib.sha256((Path(folder) / CONFIG_FILE).read_bytes()).hexdigest()


def load_module(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[TransferModule, dict]:
    """Rebuild a saved module (in eval mode) and return it with its config."""
    folder = Path(folder)
    try:
        tensors, config = load_pretrained(folder, kind=MODULE_KIND)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; train a module with `embed finetune`") from None
    spec, build = config["backbone"], config["backbone"]["build"]
    in_file = any(k.startswith("backbone.") for k in tensors)
    # a module saved before "pad" existed records no resize mode: it was made with "crop"
    options = ({"image_size": build["image_size"], "image_resize": build.get("image_resize", "crop")}
               if config["modality"] == "image" else {})
    # Weights that come from the module file need only the architecture (and, for text, the tokenizer).
    weights = build["weights"] if (config["modality"] == "text" or not in_file) else None
    if weights and not os.path.exists(weights):
        raise FileNotFoundError(f"module {folder} was trained over backbone weights {weights}, which no longer "
                                "exist; put them back there (or retrain the module)")
    backbone = create_backbone(config["modality"], build["name"], weights=weights, pretrained=not in_file,
                               **options)
    if in_file:
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")})
        backbone.weights_id = spec["weights_id"]
    elif backbone.weights_id != spec["weights_id"]:
        raise ValueError(f"module {folder} was trained over {spec['name']} weights {spec['weights_id']}, but they "
                         f"now resolve to {backbone.weights_id}; provide the original weights file "
                         f"({build['weights'] or 'the standard place'})")
    module = build_module(config["modality"], config["strategy"], config["n_classes"], backbone=backbone,
                          dropout=config["dropout"] or 0.0)
    module.build = dict(build)
    module.head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    return module.to(device).eval(), config


# ----------------------------------------------------------------------------------------------- the store


def pooled_set_for(store, backbone: Backbone) -> str:
    """The store's complete pooled feature set computed by exactly this backbone (name, weights, preprocessing)."""
    wanted = json.loads(json.dumps(backbone.preprocessing, default=_jsonable))
    candidates = [info for info in store.feature_sets.values()
                  if info.modality == backbone.modality and info.layer == "pooled"]
    for info in candidates:
        p = info.provenance
        if p.get("backbone") == backbone.name and p.get("weights_id") == backbone.weights_id \
                and backbone_preprocessing(p.get("preprocessing")) == wanted:   # either image pipeline will do
            if not info.complete:
                raise ValueError(f"{info.name} in {store.path} is incomplete; finish it with `embed extract` (it resumes)")
            return info.name
    held = ", ".join(f"{i.name} ({i.provenance.get('weights_id')})" for i in candidates) or "none"
    raise ValueError(f"{store.path} holds no pooled {backbone.modality} features of {backbone.name} with weights "
                     f"{backbone.weights_id} and this preprocessing (it holds: {held}); extract them with "
                     f"`embed extract MANIFEST --store {store.path} --{backbone.modality}-backbone {backbone.name} --add`")
