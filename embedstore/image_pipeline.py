"""Where an image's pixel work happens between its JPEG bytes and the backbone: the two image pipelines.

- "pil" (the protocol's reference, the CPU default): each DataLoader worker decodes, resizes (PIL bilinear with
  antialias), center-crops, converts to float and normalizes one image; batches of (3, S, S) float32 cross from
  the workers to the main process (600 KB an image at 224 px).
- "tensor" (the CUDA default): workers only decode, to (3, h, w) uint8 at the catalog's own size (14 KB for the
  catalog's 60x80 photos); `BatchedImageTransform` then resizes, crops and normalizes a whole batch at once on
  the compute device, each group of equally sized images as one torchvision op. On a GPU the workers are left
  with decoding alone and the pixel work runs beside the forward pass, not in front of it.

The two agree to one intensity level: torchvision's uint8 antialiased resize rounds like PIL's. Measured on 296
catalog photos (60x80), the largest difference after normalization was 0.0175 (1/255 over the smallest std).
Both also do the "pad" resize (embedstore/preprocess.py: the photo on a white square), placed by one shared
function (`pad_geometry`), so the white border agrees exactly. The photo agrees to one level but for rare pixels
at two: keeping the aspect makes the scale the same exact ratio on both axes (60x80 -> 168x224 is 2.8), where
the two libraries' fixed-point weights round differently; measured on 300 random 60x80 JPEGs, 130 of 45 million
values at 224 px (105 of 3.7 million at 64 px) were two levels apart, none more.
A store records its pipeline (provenance "preprocessing.pipeline", absent for "pil", so older stores read as
"pil"); resuming or merging refuses to mix pipelines, and `heads predict` computes features with the store's.
"""
from __future__ import annotations

import numpy as np
import torch

from embedstore.preprocess import pad_geometry

PIPELINES = ("pil", "tensor")
CHOICES = ("auto", *PIPELINES)


def resolve_pipeline(name: str | None, device: torch.device) -> str:
    """"auto" / None -> "tensor" on CUDA (the GPU does the pixel work), "pil" on a CPU (its workers already
    resize in parallel with the forward pass, and every existing CPU store was made that way)."""
    if name in (None, "auto"):
        return "tensor" if device.type == "cuda" else "pil"
    if name not in PIPELINES:
        raise ValueError(f"unknown image pipeline {name!r}; use one of {', '.join(CHOICES)}")
    return name


def recorded_preprocessing(backbone_preprocessing: dict, pipeline: str) -> dict:
    """The preprocessing a feature set records: the backbone's, plus the pipeline when it is not "pil"."""
    return dict(backbone_preprocessing) if pipeline == "pil" else {**backbone_preprocessing, "pipeline": pipeline}


def backbone_preprocessing(recorded: dict | None) -> dict:
    """A feature set's recorded preprocessing less its pipeline: what the backbone itself prescribes, to compare
    with a backbone's own (either pipeline gives its features, to one intensity level)."""
    return {k: v for k, v in (recorded or {}).items() if k != "pipeline"}


def recorded_pipeline(preprocessing: dict | None) -> str:
    """The pipeline a feature set's recorded preprocessing names ("pil" when it names none)."""
    return (preprocessing or {}).get("pipeline", "pil")


# A batch's decoded images, grouped by size in the worker (so the DataLoader pins each group and one batched op
# serves each): [(positions among the batch's decoded images (g,) int64, images (g, 3, h, w) uint8)].
DecodedImages = list


def group_by_size(images: list[torch.Tensor]) -> DecodedImages:
    """(3, h_i, w_i) uint8 images -> DecodedImages, in order of first appearance of each size."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape[1:]), []).append(i)
    return [(torch.tensor(positions, dtype=torch.int64), torch.stack([images[i] for i in positions]))
            for positions in by_shape.values()]


def decode_to_uint8(image) -> torch.Tensor:
    """An RGB PIL image -> (3, h, w) uint8, the whole worker-side transform of the "tensor" pipeline.
    A module-level function so it pickles into DataLoader workers."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)


class BatchedImageTransform:
    """A batch of decoded images of any sizes -> one normalized (n, 3, S, S) float32 channels-last tensor on
    `device`: the protocol's resize of the shorter side, center crop and normalization (or, with resize="pad",
    the photo scaled to fit and pasted on a white square), done per group of equally sized images as batched
    torchvision ops. The catalog's photos are almost all 60x80, so a batch is one or two groups.

    resize: the shorter side to resize to before the crop, or "pad", as the backbone's preprocessing records it."""

    def __init__(self, image_size: int, resize: int | str, mean, std, device: torch.device):
        self.image_size, self.device = int(image_size), device
        self.resize = "pad" if resize == "pad" else int(resize)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, groups: "DecodedImages") -> torch.Tensor:
        """groups: [(positions (g,) int64, images (g, 3, h, w) uint8)], as `embedstore.images.collate_decoded` makes them; the
        result's row i is the image at position i."""
        from torchvision.transforms.v2 import functional as F  # torchvision: only image callers need it

        size, n = self.image_size, sum(len(positions) for positions, _ in groups)
        out = torch.empty(n, 3, size, size, device=self.device, memory_format=torch.channels_last)  # (n, 3, S, S)
        for positions, group in groups:
            group = group.to(self.device, non_blocking=True)          # pinned by the DataLoader on CUDA
            if self.resize == "pad":
                group = self._pad(group, F)                           # (g, 3, S, S) uint8
            else:
                group = F.resize(group, [self.resize], antialias=True)    # the shorter side -> `resize`
                group = F.center_crop(group, [size, size])                # (g, 3, S, S) uint8
            group = F.normalize(F.to_dtype(group, torch.float32, scale=True), self.mean, self.std)
            out[positions.to(self.device, non_blocking=True)] = group
        return out

    def _pad(self, group: torch.Tensor, F) -> torch.Tensor:
        """(g, 3, h, w) uint8 -> (g, 3, S, S) uint8: resized to fit (aspect kept), centred on white."""
        size = self.image_size
        width, height, left, top = pad_geometry(group.shape[3], group.shape[2], size)
        square = torch.full((len(group), 3, size, size), 255, dtype=torch.uint8, device=group.device)
        square[:, :, top : top + height, left : left + width] = F.resize(group, [height, width], antialias=True)
        return square

    @classmethod
    def for_backbone(cls, backbone, device: torch.device) -> "BatchedImageTransform":
        p = backbone.preprocessing
        return cls(p["image_size"], p["resize"], p["mean"], p["std"], device)
