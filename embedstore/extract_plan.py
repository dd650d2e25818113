"""What a run of `embed extract` will do, decided before any batch is computed: its settings (checked), each
feature set's source name and recorded provenance, the image pipeline a set keeps (a resumed set keeps the one it
began with), a set found complete (reported without loading its backbone), a module checked against the manifest;
and the report of each set it wrote.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embedstore.backbones import list_backbones
from embedstore.cross_fit import check_folds
from embedstore.defaults import DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE, compute_precision
from embedstore.image_pipeline import CHOICES as IMAGE_PIPELINES
from embedstore.image_pipeline import recorded_pipeline, resolve_pipeline
from embedstore.manifest import Manifest
from embedstore.modules import read_module_config
from embedstore.preprocess import RESIZE_MODES
from embedstore.shards import Shard
from embedstore.store import STATUS_NAMES, FeatureStore, library_versions, now_iso


@dataclass
class ExtractSettings:
    image_backbone: str | None = DEFAULT_IMAGE_BACKBONE
    text_backbone: str | None = DEFAULT_TEXT_BACKBONE
    image_weights: str | None = None  # a local weights file, else the backbone's standard places
    text_weights: str | None = None  # a local Hugging Face folder, else the standard places
    image_size: int = 224  # center crop (or padded square); a crop's resize before it keeps the protocol's 256/224
    batch_size: int = 64  # images per forward pass
    text_batch_size: int = 256
    workers: int = 2  # DataLoader processes decoding images; 0 decodes in the main process
    device: str | None = None  # default: CUDA when present, else CPU
    add: bool = False  # allow a new backbone's features beside other backbones' in an existing store
    progress: bool = True
    image_module: str | None = None  # a saved module folder (`embed finetune`): write its dense + classifier
    text_module: str | None = None   # outputs as source "module-<id>" beside the pooled features
    shard: Shard | None = None  # only this shard's rows, into its own file <store>.shard-k-of-n.h5 (shards.py)
    dtype: str = "float32"  # stored values: float16 halves disk and memory; readers upcast to float32 per batch
    # where resize, crop and normalize run (embedstore/image_pipeline.py): "pil" in the DataLoader workers, "tensor"
    # batched on the compute device; "auto": "tensor" on CUDA, "pil" on a CPU
    image_pipeline: str = "auto"
    # "crop": the protocol's resize and center crop; "pad": the whole photo on a white square (preprocess.py).
    # Part of the image feature set's identity and of its source name ("-pad"), so the two never mix in one set.
    image_resize: str = "crop"

    def __post_init__(self):
        for option, value, least in (("--image-size", self.image_size, 1), ("--batch-size", self.batch_size, 1),
                                     ("--text-batch-size", self.text_batch_size, 1), ("--workers", self.workers, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{option} must be an integer of at least {least}, got {value!r}")
        if self.image_pipeline not in IMAGE_PIPELINES:
            raise ValueError(f"unknown --image-pipeline {self.image_pipeline!r}; use one of {', '.join(IMAGE_PIPELINES)}")
        if self.image_resize not in RESIZE_MODES:
            raise ValueError(f"unknown --image-resize {self.image_resize!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.image_resize != "crop" and not self.image_backbone:
            # a module's features keep the preprocessing its backbone was trained with: nothing here would pad
            raise ValueError(f"--image-resize {self.image_resize} applies to an --image-backbone's features, and "
                             "none is extracted; name one with --image-backbone")


@dataclass
class SourceReport:
    """What extraction did for one feature set."""

    name: str  # "<modality>/<source>"
    computed: int  # rows computed in this run (0 when the set was already complete)
    counts: dict = field(default_factory=dict)  # status name -> rows, over the whole set
    complete: bool = False
    seconds: float = 0.0
    already_complete: bool = False  # found complete before its backbone was loaded: nothing was run


def image_source_name(backbone_name: str, image_size: int, resize: str = "crop") -> str:
    """The feature set's source: the backbone's name, plus what differs from the protocol (size, then "-pad"), so
    one store holds the same backbone at several sizes and resize modes side by side (`--add`)."""
    name = backbone_name if image_size == 224 else f"{backbone_name}-{image_size}px"
    return name if resize == "crop" else f"{name}-{resize}"


def status_counts(status: np.ndarray) -> dict:
    """Rows per status name (only the statuses present), for a SourceReport."""
    return {name: int((status == code).sum()) for code, name in STATUS_NAMES.items() if (status == code).any()}


def report_if_complete(store_path: Path, modality: str, settings: ExtractSettings) -> SourceReport | None:
    """A report for a backbone's feature set that is already complete, read before the backbone is loaded
    (loading the default pair takes ~30 s, for nothing when a finished extraction is run again); None means run
    the usual path, which loads it and checks its identity (weights, preprocessing) against the store's. Only a
    registered backbone with its standard weights, the same stored dtype and (images) the same or an "auto"
    pipeline counts: explicit --image-weights / --text-weights are always loaded and checked."""
    name = settings.image_backbone if modality == "image" else settings.text_backbone
    weights = settings.image_weights if modality == "image" else settings.text_weights
    if weights or name not in list_backbones(modality):
        return None
    source = image_source_name(name, settings.image_size, settings.image_resize) if modality == "image" else name
    with FeatureStore(store_path) as store:
        info = store.feature_sets.get(f"{modality}/{source}/pooled")
    if info is None or not info.complete or info.dtype != settings.dtype:
        return None
    if modality == "image" and settings.image_pipeline != "auto" and \
            recorded_pipeline(info.provenance.get("preprocessing")) != settings.image_pipeline:
        return None  # the usual path refuses to mix pipelines, with its message
    return SourceReport(f"{modality}/{source}", 0, {k: v for k, v in info.counts.items() if v}, True, 0.0,
                        already_complete=True)


def provenance_of(backbone, source: str, device: torch.device, preprocessing: dict | None = None) -> dict:
    """The provenance a backbone's pooled feature set records (its identity, preprocessing, versions, time)."""
    provenance = {
        "backbone": backbone.name,
        "source": source,
        "compute_precision": compute_precision(device),
        "weights_id": backbone.weights_id,
        "preprocessing": backbone.preprocessing if preprocessing is None else preprocessing,
        "parameters": int(backbone.parameter_count),
        "library_versions": library_versions(),
        "created": now_iso(),
    }
    # The resolution an image backbone's weights were trained at, recorded only where it is not the protocol's
    # 224 (EfficientNet-Lite1/2), so every earlier store's provenance is unchanged. Not part of the identity: the
    # features depend on the image_size they were computed at, which preprocessing records.
    native = getattr(backbone, "native_image_size", 224)
    if native != 224:
        provenance["native_image_size"] = native
    return provenance


def pipeline_for(store_path: Path, feature_set: str, settings: ExtractSettings, device) -> str:
    """The image pipeline to run: the one asked for; for "auto", the one that began this feature set when
    resuming it (a run begun on a GPU resumes on a CPU without mixing pipelines), else the device's default."""
    if settings.image_pipeline == "auto":
        with FeatureStore(store_path) as store:
            begun = store.feature_sets.get(feature_set)
        if begun is not None:
            return recorded_pipeline(begun.provenance.get("preprocessing"))
    return resolve_pipeline(settings.image_pipeline, device)


def check_module(module_dir: Path, modality: str, manifest: Manifest) -> None:
    """A module passed as this modality's and trained on this manifest (and its folds on its items), or a ValueError."""
    config = read_module_config(module_dir)
    if config["modality"] != modality:
        raise ValueError(f"{module_dir} is a {config['modality']} module; pass it as --{config['modality']}-module")
    if config["manifest_sha256"] != manifest.sha256:
        raise ValueError(f"module {module_dir} was trained on another manifest (sha256 {config['manifest_sha256'][:12]}…, "
                         f"this one {manifest.sha256[:12]}…); its outputs would not describe these items: train a "
                         f"module on this manifest with `embed finetune`")
    check_folds(config, manifest, module_dir)
