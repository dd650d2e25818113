"""`heads predict`: classify new products with a saved head (from `heads sweep`) or a trained 3-A/3-B model
(`heads sweep --strategies 3A`, heads/end_to_end.py: images and titles straight through it) into a CSV of top-k
categories.

A pipeline: embedstore's backbones and modules compute the features a saved model of heads/ reads (rebuilt from its
recorded provenance and checked: pipelines/predict_sources.py), then the model classifies them.

Rows that cannot be predicted (missing or unreadable image, title empty after cleaning) are written with an
empty prediction and a reason; an image-only head never looks at titles and a text-only head never at images.
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from embedstore.defaults import autocast_for, resolve_device
from embedstore.images import ImageStages, image_stages
from embedstore.model_folder import read_config
from embedstore.preprocess import clean_title
from embedstore.outputs import ExclusiveLock, check_writable, partial_file
from embedstore.store import STATUS_EMPTY_TITLE, STATUS_NON_FINITE, STATUS_OK
from heads.end_to_end import load_end_to_end
from heads.estimator import FusionHead
from heads.strategies import get_strategy
from pipelines.predict_sources import (REASONS, Inputs, PredictSettings, PredictSummary, load_sources, read_inputs,
                                       sources_for)


# ----------------------------------------------------------------------------------------------- batches


def _batches(inputs: Inputs, stages: ImageStages | None, settings: PredictSettings, device):
    """(rows (b,), images (b_ok, 3, S, S) on the device or None, image status (b,) int8) in input order; status
    is all OK and images None when the model reads no images."""
    n, size = len(inputs.ids), settings.batch_size
    if stages is None:
        for begin in range(0, n, size):
            rows = np.arange(begin, min(begin + size, n))
            yield rows, None, np.full(len(rows), STATUS_OK, dtype=np.int8)
        return
    loader = DataLoader(stages.rows(inputs.files, inputs.images, np.arange(n)),
                        batch_size=size, shuffle=False, num_workers=settings.workers, collate_fn=stages.collate)
    for rows, images, status in loader:
        yield rows, None if images is None else stages.to_device(images, device), status


def _title_status(rows, image_status, inputs: Inputs) -> np.ndarray:
    """A row's status is its first problem: image before title."""
    status = image_status.copy()
    empty = np.array([not clean_title(inputs.titles[row]) for row in rows], dtype=bool)
    status[(status == STATUS_OK) & empty] = STATUS_EMPTY_TITLE
    return status


def _features(rows, images, image_status, inputs: Inputs, sources, device):
    """(status (b,), one (b_ok, D_m) tensor per source for the rows OK in every modality). A row's status is
    its first problem: image before title."""
    reads_titles = any(source.modality == "text" for source in sources)
    status = _title_status(rows, image_status, inputs) if reads_titles else image_status.copy()
    ok = status == STATUS_OK
    outputs = []
    with torch.inference_mode():
        for source in sources:
            precision = autocast_for(device, source.precision)
            if source.modality == "image":
                keep = torch.from_numpy(ok[image_status == STATUS_OK])  # of the decoded images, the rows kept
                pixels = images[keep] if images is not None else None
                if pixels is None or not len(pixels):
                    outputs.append(None)
                    continue
                with precision:
                    outputs.append(source.compute(pixels.to(device, memory_format=torch.channels_last)))
            elif ok.any():
                tokens = source.prepare([inputs.titles[row] for row in rows[ok]])  # (b_ok, 30) each
                with precision:
                    outputs.append(source.compute({k: v.to(device) for k, v in tokens.items()}))
            else:
                outputs.append(None)
    return status, [None if out is None else out.float().cpu() for out in outputs]


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class Predictor:
    """What `predict_products` needs of a model: its classes, the modalities it reads, how it prepares an image,
    and (rows, images, image status, inputs) -> (status (b,), probabilities (b_ok, C)) for one batch."""

    classes: list[str]
    modalities: tuple[str, ...]
    image_stages: ImageStages | None
    probabilities: Callable


def head_predictor(head_dir: Path, settings: PredictSettings, device) -> Predictor:
    """A fusion head over features that its recorded backbones or modules compute from the raw products."""
    head = FusionHead.from_pretrained(head_dir)
    sources = load_sources(head, settings, device)
    classes = [str(c) for c in head.classes_]

    def probabilities(rows, images, image_status, inputs):
        status, features = _features(rows, images, image_status, inputs, sources, device)
        ok = status == STATUS_OK
        return status, head.predict_proba(features) if ok.any() else np.zeros((0, len(classes)))  # (b_ok, C)

    image = next((s for s in sources if s.modality == "image"), None)
    return Predictor(classes, tuple(s.modality for s in sources), image and image.prepare, probabilities)


def decision_predictor(model_dir: Path, settings: PredictSettings, device) -> Predictor:
    """A decision-level model (LR-*, LF, ST, LFM: heads/decision.py) over the features its recorded backbones or
    modules compute from the raw products."""
    from heads.decision_model import DecisionModel

    model = DecisionModel.from_pretrained(model_dir)
    declared = get_strategy(model.strategy)
    sources = sources_for(model.metadata, model.strategy, declared.modalities, declared.layer, settings, device)
    classes = [str(c) for c in model.classes]

    def probabilities(rows, images, image_status, inputs):
        status, features = _features(rows, images, image_status, inputs, sources, device)
        ok = status == STATUS_OK
        if not ok.any():
            return status, np.zeros((0, len(classes)))
        return status, model.predict_proba([f.numpy() for f in features])  # (b_ok, C)

    image = next((s for s in sources if s.modality == "image"), None)
    return Predictor(classes, tuple(s.modality for s in sources), image and image.prepare, probabilities)


def end_to_end_predictor(model_dir: Path, device) -> Predictor:
    """A 3-A / 3-B model: images and titles straight through the trained model."""
    model, config = load_end_to_end(model_dir, device=device)
    classes, tokenize = list(config["classes"]), model.text.backbone.tokenize

    def probabilities(rows, images, image_status, inputs):
        status = _title_status(rows, image_status, inputs)
        ok = status == STATUS_OK
        if not ok.any():
            return status, np.zeros((0, len(classes)))
        pixels = images[torch.from_numpy(ok[image_status == STATUS_OK])]  # (b_ok, 3, S, S)
        tokens = tokenize([inputs.titles[row] for row in rows[ok]])      # (b_ok, 30) each
        with torch.inference_mode(), autocast_for(device):
            logits = model({"images": pixels.to(device), **{k: v.to(device) for k, v in tokens.items()}})
        return status, torch.softmax(logits.float(), dim=-1).cpu().numpy()  # (b_ok, C)

    # 3-A / 3-B models trained on PIL-transformed images (embedstore/finetune.py): served the same way
    return Predictor(classes, ("image", "text"), image_stages(model.image.backbone, "pil", device), probabilities)


def predict_products(head_dir: str | os.PathLike, inputs: str | os.PathLike, out_csv: str | os.PathLike,
                     settings: PredictSettings = PredictSettings()) -> PredictSummary:
    """Classify every row of `inputs` with the head (or 3-A/3-B model) in `head_dir`; write `out_csv` (id,
    label_k, probability_k for k = 1..top_k, reason) in input order and return what was predicted and skipped.

    One run per output at a time: a second run into the same `out_csv` while one is writing it is refused in one
    line (a lock file beside the output, .OUT.lock, removed when the run ends), since both would write one
    OUT.partial and the message of one would be false about what the file holds."""
    start = time.perf_counter()
    head_dir, out_csv = Path(head_dir), Path(out_csv)
    if not head_dir.is_dir():
        raise FileNotFoundError(f"head folder not found: {head_dir}; give RESULTS/heads/<cell> from `heads sweep` "
                                "or a 3-A/3-B model folder (RESULTS/end_to_end/<cell>/seed-<seed>)")
    check_writable(out_csv, folder=False)  # before loading anything: a bad --out fails now, not after the work
    lock = ExclusiveLock(out_csv.with_name(f".{out_csv.name}.lock"), command="heads predict", target=str(out_csv),
                         advice="wait for it to finish or give another --out", remove=True)
    with lock:
        summary = _predict_into(head_dir, inputs, out_csv, settings)
    summary.seconds = time.perf_counter() - start
    return summary


def _predict_into(head_dir: Path, inputs, out_csv: Path, settings: PredictSettings) -> PredictSummary:
    kind = read_config(head_dir)["kind"]
    device = resolve_device(settings.device)
    if kind == "end-to-end":
        predictor = end_to_end_predictor(head_dir, device)
    elif kind == "fusion-head":
        predictor = head_predictor(head_dir, settings, device)
    elif kind == "linear":
        predictor = decision_predictor(head_dir, settings, device)
    else:
        raise ValueError(f"{head_dir} holds a {kind} model; `heads predict` takes a head or decision-level model "
                         "from `heads sweep` or a 3-A/3-B model folder")
    classes = predictor.classes
    items = read_inputs(inputs, settings.columns, predictor.modalities)
    top_k = min(settings.top_k, len(classes))
    summary = PredictSummary(out_csv, rows=len(items.ids), predicted=0, malformed=items.malformed)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    # a failed run (an error, a full disk, Ctrl-C, SIGTERM through the CLI) leaves neither a half-written CSV nor
    # its .partial behind
    with partial_file(out_csv) as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id"] + [f"{c}_{k}" for k in range(1, top_k + 1) for c in ("label", "probability")]
                        + ["reason"])
        for rows, images, image_status in _batches(items, predictor.image_stages, settings, device):
            status, probabilities = predictor.probabilities(rows, images, image_status, items)
            status, probabilities = _without_non_finite(status, probabilities)
            _write_rows(writer, [items.ids[r] for r in rows], status, probabilities, classes, top_k, summary)
    return summary


def _without_non_finite(status: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A row whose features or head output hold NaN/inf gets the reason "non-finite features", never a `nan`
    probability. `probabilities` (b_ok, C) belongs to the rows whose status is ok, in order."""
    finite = np.isfinite(probabilities).all(axis=1)  # (b_ok,)
    if finite.all():
        return status, probabilities
    status = status.copy()
    status[np.flatnonzero(status == STATUS_OK)[~finite]] = STATUS_NON_FINITE
    return status, probabilities[finite]


def _write_rows(writer, ids, status, probabilities, classes, top_k: int, summary: PredictSummary) -> None:
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]  # (b_ok, k), most probable first
    predicted = iter(range(len(probabilities)))
    for row_id, code in zip(ids, status):
        if code != STATUS_OK:
            reason = REASONS[int(code)]
            summary.skipped[reason] = summary.skipped.get(reason, 0) + 1
            writer.writerow([row_id] + [""] * (2 * top_k) + [reason])
            continue
        i = next(predicted)
        cells = [value for c in order[i] for value in (classes[c], f"{probabilities[i, c]:.6f}")]
        writer.writerow([row_id] + cells + [""])
        summary.predicted += 1
