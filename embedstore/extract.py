"""`embed extract`: run each backbone once over the manifest and stream its pooled features into the store.

Streaming and bounded memory: items flow through a DataLoader batch by batch and each batch is written
before the next is computed; nothing grows with the catalog but the (N,) status column. Image decoding and
transforms run in DataLoader worker processes so they overlap the forward pass. Resuming is free: only rows
whose status is still pending are computed (see store.py for why a killed run leaves no half rows).
"""
from __future__ import annotations

import functools
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from embedstore.backbones import create_backbone, list_backbones
from embedstore.catalog import open_catalog_from_spec
from embedstore.chunks import check_feature_dtype
from embedstore.cross_fit import RowPlan, check_folds
from embedstore.defaults import autocast_for, compute_precision, resolve_device
from embedstore.image_pipeline import CHOICES as IMAGE_PIPELINES
from embedstore.image_pipeline import recorded_pipeline, recorded_preprocessing, resolve_pipeline
from embedstore.images import ImageStages, image_stages
from embedstore.manifest import Manifest
from embedstore.modules import config_sha256, load_module, module_id, pooled_set_for, read_module_config
from embedstore.preprocess import RESIZE_MODES, clean_title
from embedstore.shards import Shard, shard_job
from embedstore.store import STATUS_EMPTY_TITLE, STATUS_NAMES, STATUS_OK, FeatureStore, library_versions, now_iso
from embedstore.store_writer import FeatureSetWriter, create_store
from embedstore.workers import die_with, worker_context


@dataclass
class ExtractSettings:
    image_backbone: str | None = "efficientnet_lite0"
    text_backbone: str | None = "all-MiniLM-L6-v2"
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


def extract(manifest_path: str | Path, store_path: str | Path, settings: ExtractSettings) -> list[SourceReport]:
    """Write the pooled features of the chosen backbones for every manifest item into the store (with
    `settings.shard`: for the shard's items, into `settings.shard.path_for(store_path)`)."""
    check_feature_dtype(settings.dtype)  # before any work
    manifest = Manifest.load(manifest_path)
    shard_attrs = None
    if settings.shard is not None:
        # from here on `manifest` holds the shard's items only, under the whole manifest's sha256
        manifest, store_path, shard_attrs = shard_job(manifest, store_path, settings.shard)
    modules = {"image": settings.image_module, "text": settings.text_module}
    for modality, module_dir in modules.items():
        if module_dir:
            _check_module(Path(module_dir), modality, manifest)  # refuse before anything is written
    create_store(
        store_path,
        ids=[item.id for item in manifest.items],
        labels=[manifest.classes.index(item.label) for item in manifest.items],
        splits=[item.split for item in manifest.items],
        classes=manifest.classes,
        manifest_sha256=manifest.sha256,
        manifest_json=Path(manifest_path).read_text(),
        catalog_spec=manifest.catalog,
        shard=shard_attrs,
    )
    device = resolve_device(settings.device)  # under torchrun: this process's GPU (LOCAL_RANK)
    reports = []
    if settings.image_backbone:
        reports.append(_already_complete(Path(store_path), "image", settings)
                       or _extract_images(manifest, Path(store_path), settings, device))
    if settings.text_backbone:
        reports.append(_already_complete(Path(store_path), "text", settings)
                       or _extract_texts(manifest, Path(store_path), settings, device))
    for modality, module_dir in modules.items():
        if module_dir:
            reports.append(_extract_module(manifest, Path(store_path), Path(module_dir), modality, settings, device))
    return reports


def _already_complete(store_path: Path, modality: str, settings: ExtractSettings) -> SourceReport | None:
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


def _provenance(backbone, source: str, device: torch.device, preprocessing: dict | None = None) -> dict:
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


# ----------------------------------------------------------------------------------------------- images




def _extract_images(manifest: Manifest, store_path: Path, settings: ExtractSettings, device) -> SourceReport:
    backbone = create_backbone("image", settings.image_backbone, weights=settings.image_weights,
                               image_size=settings.image_size, image_resize=settings.image_resize)
    source = image_source_name(backbone.name, settings.image_size, settings.image_resize)
    stages = image_stages(backbone, _pipeline_for(store_path, f"image/{source}/pooled", settings, device), device)
    provenance = _provenance(backbone, source, device, recorded_preprocessing(backbone.preprocessing, stages.pipeline))
    with FeatureSetWriter(store_path, modality="image", source=source, layers={"pooled": backbone.feature_dim},
                          provenance={"pooled": provenance}, add=settings.add, dtype=settings.dtype) as writer:
        # channels-last convolutions measured 1.6-2.5x faster on CPU for EfficientNet-Lite0 (and suit GPUs)
        backbone = backbone.to(device, memory_format=torch.channels_last).eval()
        start = time.perf_counter()
        pending = _stream_images(manifest, writer, stages, lambda images, rows: {"pooled": backbone(images)},
                                 settings, device, f"image/{source}")
        complete = writer.finish()
        counts = _counts(writer.status)
    return SourceReport(f"image/{source}", len(pending), counts, complete, time.perf_counter() - start)


def _pipeline_for(store_path: Path, feature_set: str, settings: ExtractSettings, device) -> str:
    """The image pipeline to run: the one asked for; for "auto", the one that began this feature set when
    resuming it (a run begun on a GPU resumes on a CPU without mixing pipelines), else the device's default."""
    if settings.image_pipeline == "auto":
        with FeatureStore(store_path) as store:
            begun = store.feature_sets.get(feature_set)
        if begun is not None:
            return recorded_pipeline(begun.provenance.get("preprocessing"))
    return resolve_pipeline(settings.image_pipeline, device)


def _stream_images(manifest: Manifest, writer: FeatureSetWriter, stages: ImageStages, compute,
                   settings: ExtractSettings, device, desc: str) -> np.ndarray:
    """Run `compute(images (n_ok, 3, H, W), rows (n_ok,)) -> {layer: (n_ok, D)}` over the writer's pending rows
    (`rows`: their manifest rows); returns them.

    Overlap: workers decode (and, for "pil", transform) ahead; on CUDA a batch's outputs copy to pinned host
    memory without waiting, and the host writes batch i - 1 while the device computes batch i."""
    catalog = open_catalog_from_spec(manifest.catalog)
    refs = [item.image for item in manifest.items]
    pending = writer.pending_rows()
    loader = DataLoader(
        stages.rows(catalog, refs, pending),
        batch_size=settings.batch_size, shuffle=False, num_workers=settings.workers,
        collate_fn=stages.collate, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=2 if settings.workers else None,
        multiprocessing_context=worker_context() if settings.workers else None,
        worker_init_fn=functools.partial(die_with, os.getpid()) if settings.workers else None,
    )
    with tqdm(total=len(manifest.items), initial=len(manifest.items) - len(pending), unit="img",
              desc=desc, disable=not settings.progress) as bar:
        in_flight = None   # the previous batch, its outputs on their way to the host
        for rows, images, status in loader:
            outputs = {}
            if images is not None:
                with torch.inference_mode():
                    images = stages.to_device(images, device)   # (n_ok, 3, S, S): pixel work in float32
                    with autocast_for(device):
                        outputs = compute(images, rows[status == STATUS_OK])
            batch = _HostCopy(rows, outputs, status)   # starts the copies; waits for nothing on CUDA
            if in_flight is not None:
                bar.update(in_flight.write(writer))
            in_flight = batch
        if in_flight is not None:
            bar.update(in_flight.write(writer))
    return pending


class _HostCopy:
    """One batch's outputs on their way to the host. On CUDA each (n_ok, D) output is copied into pinned memory
    without waiting and an event marks the end of the copies; `write` waits for that event only, so the device is
    already computing the next batch. On a CPU the outputs are host tensors already."""

    def __init__(self, rows: np.ndarray, outputs: dict[str, torch.Tensor], status: np.ndarray):
        self.rows, self.status, self.values, self.done = rows, status, {}, None
        stream = None
        for layer, value in outputs.items():
            value = value.float()
            if value.device.type == "cuda":
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                self.values[layer] = host.copy_(value, non_blocking=True)
                # the copy runs on the output's device's stream, which under torchrun (cuda:LOCAL_RANK) need not
                # be the current device's: the event must be recorded there to wait for it
                stream = torch.cuda.current_stream(value.device)
            else:
                self.values[layer] = value
        if stream is not None:
            self.done = torch.cuda.Event()
            self.done.record(stream)

    def write(self, writer: FeatureSetWriter) -> int:
        if self.done is not None:
            self.done.synchronize()
        writer.write(self.rows, {layer: value.numpy() for layer, value in self.values.items()}, self.status)
        return len(self.rows)


# ----------------------------------------------------------------------------------------------- texts


def _extract_texts(manifest: Manifest, store_path: Path, settings: ExtractSettings, device) -> SourceReport:
    backbone = create_backbone("text", settings.text_backbone, weights=settings.text_weights)
    source = backbone.name
    with FeatureSetWriter(store_path, modality="text", source=source, layers={"pooled": backbone.feature_dim},
                          provenance={"pooled": _provenance(backbone, source, device)}, add=settings.add,
                          dtype=settings.dtype) as writer:
        backbone = backbone.to(device).eval()
        start = time.perf_counter()
        pending = _stream_texts(manifest, writer, backbone.tokenize,
                                lambda tokens, rows: {"pooled": backbone(**tokens)}, settings, device, f"text/{source}")
        complete = writer.finish()
        counts = _counts(writer.status)
    return SourceReport(f"text/{source}", len(pending), counts, complete, time.perf_counter() - start)


def _stream_texts(manifest: Manifest, writer: FeatureSetWriter, tokenize, compute, settings: ExtractSettings,
                  device, desc: str) -> np.ndarray:
    """Run `compute(tokens: dict of (n_ok, 30), rows (n_ok,)) -> {layer: (n_ok, D)}` over the writer's pending rows."""
    titles = [item.title for item in manifest.items]
    pending = writer.pending_rows()
    with tqdm(total=len(titles), initial=len(titles) - len(pending), unit="title",
              desc=desc, disable=not settings.progress) as bar:
        for begin in range(0, len(pending), settings.text_batch_size):
            rows = pending[begin : begin + settings.text_batch_size]
            usable = np.array([bool(clean_title(titles[row])) for row in rows])
            status = np.where(usable, STATUS_OK, STATUS_EMPTY_TITLE).astype(np.int8)
            values = {}
            if usable.any():
                tokens = tokenize([titles[row] for row in rows[usable]])  # (n_ok, 30) each
                tokens = {key: value.to(device, non_blocking=True) for key, value in tokens.items()}
                with torch.inference_mode(), autocast_for(device):
                    outputs = compute(tokens, rows[usable])
                values = {layer: value.float().cpu().numpy() for layer, value in outputs.items()}
            writer.write(rows, values, status)
            bar.update(len(rows))
    return pending


# ----------------------------------------------------------------------------------------------- modules


def _extract_module(manifest: Manifest, store_path: Path, module_dir: Path, modality: str,
                    settings: ExtractSettings, device) -> SourceReport:
    """A module's dense (S2/S3) and classifier outputs as source "module-<id>". S1/S2 modules read the store's
    pooled features of their backbone when it holds them (no backbone pass); otherwise the backbone runs.
    A cross-fitted module's training rows get their fold module's outputs (embedstore/cross_fit.py)."""
    _check_module(module_dir, modality, manifest)
    module, config = load_module(module_dir, device=device)
    plan = RowPlan.build(module, config, module_dir, manifest, device)
    identity = module_id(module_dir)
    source = f"module-{identity}"
    provenance = {
        "backbone": module.backbone.name, "weights_id": module.backbone.weights_id, "source": source,
        "preprocessing": module.backbone.preprocessing, "parameters": module.parameter_counts()["total"],
        "module_dir": str(module_dir.resolve()), "module_id": identity, "module_config_sha256": config_sha256(module_dir),
        "module_strategy": config["strategy"], "module_manifest_sha256": config["manifest_sha256"],
        "compute_precision": compute_precision(device),
        "library_versions": library_versions(), "created": now_iso(),
    }
    if plan.k:
        provenance["cross_fit"] = plan.k
    layers = module.head.layers
    stages = None
    if modality == "image":
        pipeline = _pipeline_for(store_path, f"image/{source}/{next(iter(layers))}", settings, device)
        stages = image_stages(module.backbone, pipeline, device)
        provenance["preprocessing"] = recorded_preprocessing(module.backbone.preprocessing, stages.pipeline)
    pooled = _cached_pooled(store_path, module.backbone) if module.frozen else None
    if pooled is not None:  # outputs of the stored pooled features: made the way those were
        provenance["preprocessing"] = pooled[2]
    with FeatureSetWriter(store_path, modality=modality, source=source, layers=layers, add=True,
                          provenance={layer: provenance for layer in layers}, dtype=settings.dtype) as writer:
        start = time.perf_counter()
        desc = f"{modality}/{source}"

        def compute(inputs, rows):  # images (n, 3, H, W) or tokens -> {"dense": (n, 500), "classifier": (n, C)}
            return plan.run(inputs, rows, lambda m, x: m.head.forward_features(m.forward_pooled(x)))

        if pooled is not None:
            pending = _module_from_pooled(writer, plan, pooled, device)
        elif modality == "image":
            pending = _stream_images(manifest, writer, stages, compute, settings, device, desc)
        else:
            pending = _stream_texts(manifest, writer, module.backbone.tokenize, compute, settings, device, desc)
        complete = writer.finish()
        counts = _counts(writer.status)
    return SourceReport(f"{modality}/{source}", len(pending), counts, complete, time.perf_counter() - start)


def _check_module(module_dir: Path, modality: str, manifest: Manifest) -> None:
    config = read_module_config(module_dir)
    if config["modality"] != modality:
        raise ValueError(f"{module_dir} is a {config['modality']} module; pass it as --{config['modality']}-module")
    if config["manifest_sha256"] != manifest.sha256:
        raise ValueError(f"module {module_dir} was trained on another manifest (sha256 {config['manifest_sha256'][:12]}…, "
                         f"this one {manifest.sha256[:12]}…); its outputs would not describe these items: train a "
                         f"module on this manifest with `embed finetune`")
    check_folds(config, manifest, module_dir)


def _cached_pooled(store_path: Path, backbone) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(pooled (N, D), status (N,), their recorded preprocessing) of this exact backbone from the store, or None
    when it holds none."""
    with FeatureStore(store_path) as store:
        try:
            name = pooled_set_for(store, backbone)
        except ValueError:
            return None
        status = store.status(name)
        data = store.load([name])
        pooled = np.full((len(status), data.features[name].shape[1]), np.nan, dtype=np.float32)
        pooled[status == STATUS_OK] = data.features[name]  # load() keeps manifest order
        preprocessing = store.feature_sets[name].provenance.get("preprocessing")
    return pooled, status, preprocessing


def _module_from_pooled(writer: FeatureSetWriter, plan: RowPlan, pooled, device, batch_size: int = 4096) -> np.ndarray:
    features, status, _ = pooled
    pending = writer.pending_rows()
    for begin in range(0, len(pending), batch_size):
        rows = pending[begin : begin + batch_size]
        ok = rows[status[rows] == STATUS_OK]
        values = {}
        if ok.size:
            with torch.inference_mode():
                outputs = plan.run(torch.from_numpy(features[ok]).to(device), ok,
                                   lambda m, x: m.head.forward_features(x))
            values = {layer: value.float().cpu().numpy() for layer, value in outputs.items()}
        writer.write(rows, values, status[rows])
    return pending


def _counts(status: np.ndarray) -> dict:
    return {name: int((status == code).sum()) for code, name in STATUS_NAMES.items() if (status == code).any()}

