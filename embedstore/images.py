"""Images decoded for a backbone: one dataset item per manifest row, decoded and transformed in a DataLoader
worker, and the collate that keeps the rows whose image is bad (with their status) beside the good images.
Shared by extraction (embedstore/extract.py), S3 training (embedstore/finetune.py) and `heads predict`.
`image_stages` splits the pixel work between the workers and the compute device by image pipeline
(embedstore/image_pipeline.py).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from embedstore.image_pipeline import BatchedImageTransform, decode_to_uint8, group_by_size
from embedstore.preprocess import as_viewed_rgb, shorter_side
from embedstore.store import STATUS_IMAGE_TOO_LARGE, STATUS_MISSING_IMAGE, STATUS_OK, STATUS_UNREADABLE_IMAGE


class ImageRows(Dataset):
    """Decodes and transforms one item per call, in a worker process; bad images become a status, not an error.

    `resize`: the shorter side the transform resizes to (None: no such resize, as "pad" scales the longer side
    down to the square's). An image whose resized size would pass PIL's pixel limit is "image too large" before
    any work: a 1x40000 strip is 40k pixels on disk but 2.6 billion after a resize of its shorter side to 256,
    which would exhaust memory in either image pipeline."""

    def __init__(self, catalog, refs: list[str], rows: np.ndarray, transform, *, resize: int | None = None):
        self.catalog, self.refs, self.rows, self.transform = catalog, refs, rows, transform
        self.resize = resize

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            data = self.catalog.read_image_bytes(self.refs[row])
        except FileNotFoundError:
            return row, None, STATUS_MISSING_IMAGE
        try:
            with warnings.catch_warnings():
                # PIL only warns between its pixel limit and twice it, and decodes: gigabytes for one item
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    if self.resize and resized_pixels(image.size, self.resize) > Image.MAX_IMAGE_PIXELS:
                        return row, None, STATUS_IMAGE_TOO_LARGE
                    pixels = self.transform(as_viewed_rgb(image))  # (3, H, W)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return row, None, STATUS_IMAGE_TOO_LARGE
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return row, None, STATUS_UNREADABLE_IMAGE
        return row, pixels, STATUS_OK


def resized_pixels(size: tuple[int, int], resize: int) -> int:
    """Pixels of a (width, height) image once its shorter side is `resize` (the longer side as torchvision and
    PIL compute it, to within one pixel)."""
    short, long = sorted(max(1, side) for side in size)
    return resize * int(resize * long / short)


def collate_images(batch):
    """A DataLoader batch of ImageRows items -> (rows (n,) int64, images (n_ok, 3, H, W) or None, status (n,) int8)."""
    rows = np.array([row for row, _, _ in batch], dtype=np.int64)
    status = np.array([code for _, _, code in batch], dtype=np.int8)
    ok = [pixels for _, pixels, code in batch if code == STATUS_OK]
    images = torch.stack(ok) if ok else None  # (n_ok, 3, H, W)
    return rows, images, status


def collate_decoded(batch):
    """The "tensor" pipeline's collate: (rows (n,) int64, DecodedImages or None, status (n,) int8); the decoded
    uint8 images grouped by size, stacked here in the worker so that the DataLoader pins each group."""
    rows = np.array([row for row, _, _ in batch], dtype=np.int64)
    status = np.array([code for _, _, code in batch], dtype=np.int8)
    ok = [pixels for _, pixels, code in batch if code == STATUS_OK]
    return rows, (group_by_size(ok) if ok else None), status


@dataclass
class ImageStages:
    """One image pipeline's stages: `worker` (PIL RGB image -> tensor) and `collate` run in DataLoader workers;
    `to_device` turns a collated batch into the backbone's (n_ok, 3, S, S) channels-last input on the device."""
    pipeline: str
    worker: Callable
    collate: Callable
    resize: int | None      # the shorter side images are resized to (ImageRows refuses what would be too large);
                            # None for "pad", whose resized photo fits in the S x S square
    on_device: BatchedImageTransform | None = None

    def rows(self, catalog, refs: list[str], rows: np.ndarray) -> ImageRows:
        """The dataset of these manifest rows' images for this pipeline's workers."""
        return ImageRows(catalog, refs, rows, self.worker, resize=self.resize)

    def to_device(self, images, device: torch.device) -> torch.Tensor:
        if self.on_device is None:   # "pil": normalized float batches come from the workers
            return images.to(device, memory_format=torch.channels_last, non_blocking=True)
        return self.on_device(images)  # "tensor": resize, crop and normalize run here, batched


def image_stages(backbone, pipeline: str, device: torch.device) -> ImageStages:
    """The stages of `pipeline` ("pil" | "tensor", resolved) for an ImageBackbone's evaluation preprocessing
    (its resize mode, "crop" or "pad", included)."""
    resize = shorter_side(backbone.preprocessing)
    if pipeline == "pil":
        return ImageStages("pil", backbone.image_transform(train=False), collate_images, resize)
    return ImageStages("tensor", decode_to_uint8, collate_decoded, resize,
                       BatchedImageTransform.for_backbone(backbone, device))
