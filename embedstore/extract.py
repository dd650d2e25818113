"""`embed extract`: run each backbone once over the manifest and stream its pooled features into the store.

Streaming and bounded memory: items flow through a DataLoader batch by batch and each batch is written
before the next is computed; nothing grows with the catalog but the (N,) status column. Image decoding and
transforms run in DataLoader worker processes so they overlap the forward pass. Resuming is free: only rows
whose status is still pending are computed (see store.py for why a killed run leaves no half rows).
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from embedstore.backbones import create_backbone
from embedstore.catalog import open_catalog_from_spec
from embedstore.manifest import Manifest
from embedstore.preprocess import clean_title
from embedstore.store import (
    STATUS_EMPTY_TITLE,
    STATUS_MISSING_IMAGE,
    STATUS_NAMES,
    STATUS_OK,
    STATUS_UNREADABLE_IMAGE,
    FeatureSetWriter,
    create_store,
    library_versions,
    now_iso,
)


@dataclass
class ExtractSettings:
    image_backbone: str | None = "efficientnet_lite0"
    text_backbone: str | None = "all-MiniLM-L6-v2"
    image_weights: str | None = None  # a local weights file, else the backbone's standard places
    text_weights: str | None = None  # a local Hugging Face folder, else the standard places
    image_size: int = 224  # center crop; the resize before it keeps the protocol's 256/224 ratio
    batch_size: int = 64  # images per forward pass
    text_batch_size: int = 256
    workers: int = 2  # DataLoader processes decoding images; 0 decodes in the main process
    device: str | None = None  # default: CUDA when present, else CPU
    add: bool = False  # allow a new backbone's features beside other backbones' in an existing store
    progress: bool = True


@dataclass
class SourceReport:
    name: str  # "<modality>/<source>"
    computed: int  # rows computed in this run (0 when the set was already complete)
    counts: dict = field(default_factory=dict)  # status name -> rows, over the whole set
    complete: bool = False
    seconds: float = 0.0


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None


def autocast_for(device: torch.device):
    """bf16 autocast where it pays (CUDA); plain float32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def image_source_name(backbone_name: str, image_size: int) -> str:
    return backbone_name if image_size == 224 else f"{backbone_name}-{image_size}px"


def extract(manifest_path: str | Path, store_path: str | Path, settings: ExtractSettings) -> list[SourceReport]:
    """Write the pooled features of the chosen backbones for every manifest item into the store."""
    manifest = Manifest.load(manifest_path)
    create_store(
        store_path,
        ids=[item.id for item in manifest.items],
        labels=[manifest.classes.index(item.label) for item in manifest.items],
        splits=[item.split for item in manifest.items],
        classes=manifest.classes,
        manifest_sha256=manifest.sha256,
        manifest_json=Path(manifest_path).read_text(),
        catalog_spec=manifest.catalog,
    )
    device = resolve_device(settings.device)
    reports = []
    if settings.image_backbone:
        reports.append(_extract_images(manifest, Path(store_path), settings, device))
    if settings.text_backbone:
        reports.append(_extract_texts(manifest, Path(store_path), settings, device))
    return reports


def _provenance(backbone, source: str) -> dict:
    return {
        "backbone": backbone.name,
        "source": source,
        "weights_id": backbone.weights_id,
        "preprocessing": backbone.preprocessing,
        "parameters": int(backbone.parameter_count),
        "library_versions": library_versions(),
        "created": now_iso(),
    }


# ----------------------------------------------------------------------------------------------- images


class _ImageRows(Dataset):
    """Decodes and transforms one item per call, in a worker process; bad images become a status, not an error."""

    def __init__(self, catalog, refs: list[str], rows: np.ndarray, transform):
        self.catalog, self.refs, self.rows, self.transform = catalog, refs, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            data = self.catalog.read_image_bytes(self.refs[row])
        except FileNotFoundError:
            return row, None, STATUS_MISSING_IMAGE
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = self.transform(image.convert("RGB"))  # (3, H, W)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return row, None, STATUS_UNREADABLE_IMAGE
        return row, pixels, STATUS_OK


def _collate_images(batch):
    rows = np.array([row for row, _, _ in batch], dtype=np.int64)
    status = np.array([code for _, _, code in batch], dtype=np.int8)
    ok = [pixels for _, pixels, code in batch if code == STATUS_OK]
    images = torch.stack(ok) if ok else None  # (n_ok, 3, H, W)
    return rows, images, status


def _extract_images(manifest: Manifest, store_path: Path, settings: ExtractSettings, device) -> SourceReport:
    backbone = create_backbone("image", settings.image_backbone, weights=settings.image_weights,
                               image_size=settings.image_size)
    source = image_source_name(backbone.name, settings.image_size)
    catalog = open_catalog_from_spec(manifest.catalog)
    refs = [item.image for item in manifest.items]
    with FeatureSetWriter(store_path, modality="image", source=source, layers={"pooled": backbone.feature_dim},
                          provenance={"pooled": _provenance(backbone, source)}, add=settings.add) as writer:
        pending = writer.pending_rows()
        loader = DataLoader(
            _ImageRows(catalog, refs, pending, backbone.image_transform(train=False)),
            batch_size=settings.batch_size, shuffle=False, num_workers=settings.workers,
            collate_fn=_collate_images, pin_memory=device.type == "cuda",
            persistent_workers=False, prefetch_factor=2 if settings.workers else None,
        )
        backbone = backbone.to(device).eval()
        start = time.perf_counter()
        with tqdm(total=len(manifest.items), initial=len(manifest.items) - len(pending), unit="img",
                  desc=f"image/{source}", disable=not settings.progress) as bar:
            for rows, images, status in loader:
                values = {}
                if images is not None:
                    with torch.inference_mode(), autocast_for(device):
                        features = backbone(images.to(device, non_blocking=True))  # (n_ok, D)
                    values["pooled"] = features.float().cpu().numpy()
                writer.write(rows, values, status)
                bar.update(len(rows))
        complete = writer.finish()
        counts = _counts(writer.status)
    return SourceReport(f"image/{source}", len(pending), counts, complete, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------- texts


def _extract_texts(manifest: Manifest, store_path: Path, settings: ExtractSettings, device) -> SourceReport:
    backbone = create_backbone("text", settings.text_backbone, weights=settings.text_weights)
    source = backbone.name
    titles = [item.title for item in manifest.items]
    with FeatureSetWriter(store_path, modality="text", source=source, layers={"pooled": backbone.feature_dim},
                          provenance={"pooled": _provenance(backbone, source)}, add=settings.add) as writer:
        pending = writer.pending_rows()
        backbone = backbone.to(device).eval()
        start = time.perf_counter()
        with tqdm(total=len(titles), initial=len(titles) - len(pending), unit="title",
                  desc=f"text/{source}", disable=not settings.progress) as bar:
            for begin in range(0, len(pending), settings.text_batch_size):
                rows = pending[begin : begin + settings.text_batch_size]
                usable = np.array([bool(clean_title(titles[row])) for row in rows])
                status = np.where(usable, STATUS_OK, STATUS_EMPTY_TITLE).astype(np.int8)
                values = {}
                if usable.any():
                    tokens = backbone.tokenize([titles[row] for row in rows[usable]])  # (n_ok, 30) each
                    tokens = {key: value.to(device, non_blocking=True) for key, value in tokens.items()}
                    with torch.inference_mode(), autocast_for(device):
                        features = backbone(**tokens)  # (n_ok, D)
                    values["pooled"] = features.float().cpu().numpy()
                writer.write(rows, values, status)
                bar.update(len(rows))
        complete = writer.finish()
        counts = _counts(writer.status)
    return SourceReport(f"text/{source}", len(pending), counts, complete, time.perf_counter() - start)


def _counts(status: np.ndarray) -> dict:
    return {name: int((status == code).sum()) for code, name in STATUS_NAMES.items() if (status == code).any()}

