"""`heads predict` for a joined source (heads/joined.py): each member rebuilt from its own recorded provenance
(pipelines/predict_sources.py builds them), run on the same products, their features side by side.

Members may prepare their inputs differently (EfficientNet-Lite0 at 224 px and -Lite2 at 260 px, two tokenizers):
`JoinedImageStages` decodes each product's image for every member's pipeline in the DataLoader worker and hands
the batch over as `Parts` (one batch per member), which the predict loop selects rows of and moves to the device
as it would one tensor; `joined_tokenize` does the same for titles. `compute` runs each member in the precision
its features were extracted in and concatenates their outputs in member order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from embedstore.defaults import autocast_for
from embedstore.store import STATUS_OK


class Parts:
    """One batch per member, used where one batch tensor (or token dict) would be: rows selected by a mask,
    moved to a device, counted."""

    def __init__(self, parts: list):
        self.parts = parts

    def __getitem__(self, keep) -> "Parts":
        return Parts([p[keep] if torch.is_tensor(p) else {k: v[keep] for k, v in p.items()} for p in self.parts])

    def __len__(self) -> int:
        first = self.parts[0]
        return len(first) if torch.is_tensor(first) else len(next(iter(first.values())))

    def to(self, device, **kwargs) -> "Parts":
        return Parts([p.to(device, **kwargs) if torch.is_tensor(p) else {k: v.to(device) for k, v in p.items()}
                      for p in self.parts])


class _JoinedRows(Dataset):
    """Each member pipeline's dataset of the same rows: an item is (row, [pixels per member], status), its
    status the first member's problem (the same image bytes decode alike for every member)."""

    def __init__(self, datasets: list[Dataset]):
        self.datasets = datasets

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, i: int):
        items = [d[i] for d in self.datasets]
        status = next((code for _, _, code in items if code != STATUS_OK), STATUS_OK)
        return items[0][0], [pixels for _, pixels, _ in items], status


@dataclass
class _JoinedCollate:
    collates: list[Callable]

    def __call__(self, batch):
        per_member = []
        for m, collate in enumerate(self.collates):
            rows, images, status = collate([(row, pixels[m] if code == STATUS_OK else None, code)
                                            for row, pixels, code in batch])
            per_member.append(images)
        return rows, (None if per_member[0] is None else per_member), status


@dataclass
class JoinedImageStages:
    """The members' image stages as one (the predict loop's `rows`, `collate`, `to_device`)."""
    members: list   # embedstore.images.ImageStages, one per member

    def rows(self, catalog, refs: list[str], rows: np.ndarray) -> Dataset:
        return _JoinedRows([stages.rows(catalog, refs, rows) for stages in self.members])

    @property
    def collate(self) -> Callable:
        return _JoinedCollate([stages.collate for stages in self.members])

    def to_device(self, images: list, device: torch.device) -> Parts:
        return Parts([stages.to_device(batch, device) for stages, batch in zip(self.members, images)])


def joined_tokenize(tokenizers: list[Callable]) -> Callable:
    """Titles -> {"parts": Parts of each member's tokens}: one dict entry, moved to the device like a tensor."""
    return lambda titles: {"parts": Parts([tokenize(titles) for tokenize in tokenizers])}


def joined_compute(members: list, device: torch.device) -> Callable:
    """Parts (images) or {"parts": Parts} (tokens) -> (b, sum of D_m): every member's features, side by side.
    `members`: the rebuilt sources (predict_sources.FeatureSource: compute, precision)."""
    def compute(inputs) -> torch.Tensor:
        parts = inputs["parts"] if isinstance(inputs, dict) else inputs
        outputs = []
        for member, part in zip(members, parts.parts):
            with autocast_for(device, member.precision):
                outputs.append(member.compute(part).float())
        return torch.cat(outputs, dim=1)
    return compute
