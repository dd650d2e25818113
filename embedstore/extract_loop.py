"""`embed extract`'s loops: a backbone's or a module's outputs computed over a feature set's pending rows and
written batch by batch (nothing grows with the catalog). Images stream through DataLoader workers, which decode (and,
for the "pil" pipeline, transform) ahead while on CUDA the host writes batch i - 1 as the device computes batch i;
titles are tokenized in batches; a frozen module's outputs can come from the store's pooled features instead.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from embedstore.catalog import open_catalog_from_spec
from embedstore.cross_fit import RowPlan
from embedstore.defaults import autocast_for
from embedstore.extract_plan import ExtractSettings
from embedstore.images import ImageStages
from embedstore.manifest import Manifest
from embedstore.preprocess import clean_title
from embedstore.store import STATUS_EMPTY_TITLE, STATUS_OK
from embedstore.store_writer import FeatureSetWriter
from embedstore.workers import die_with, worker_context


def stream_images(manifest: Manifest, writer: FeatureSetWriter, stages: ImageStages, compute,
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


def stream_texts(manifest: Manifest, writer: FeatureSetWriter, tokenize, compute, settings: ExtractSettings,
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


def module_from_pooled(writer: FeatureSetWriter, plan: RowPlan, pooled, device, batch_size: int = 4096) -> np.ndarray:
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
