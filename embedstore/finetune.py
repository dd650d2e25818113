"""`embed finetune`: train an image or text module with transfer strategy 1, 2 or 3.

S1 and S2 keep the backbone frozen, so they train the head over the store's cached pooled features (seconds,
no backbone pass). S3 trains everything on the raw catalog through the manifest (images: Adam + random
horizontal flip, decoded in DataLoader workers; texts: AdamW + gradient clipping at 1.0). S1/S2 use their
modality's optimizer too, so the three strategies differ only in what they train. All: cross-entropy, early
stopping on validation accuracy, test accuracy and macro-F1 at the best validation epoch.

Resuming (S3) and several processes under torchrun (S3) are the shared training loop's
(embedstore/training.py): a checkpoint per epoch, reseeded epochs, DistributedDataParallel, rank 0 writes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from embedstore.cross_fit import check_k, finetune_cross_fitted
from embedstore.defaults import DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE
from embedstore.images import ImageRows, collate_images
from embedstore.manifest import SPLITS, Manifest
from embedstore.metrics import classification_metrics
from embedstore.preprocess import RESIZE_MODES, clean_title, shorter_side
from embedstore.modules import TransferModule, build_module, check_strategy, pooled_set_for
from embedstore.store import STATUS_OK, FeatureStore
from embedstore.training import Ranks, check_training_numbers, fit, predict, training_processes

DEFAULT_BACKBONES = {"image": DEFAULT_IMAGE_BACKBONE, "text": DEFAULT_TEXT_BACKBONE}


@dataclass
class FinetuneSettings:
    modality: str = "image"
    strategy: int = 2
    backbone: str | None = None        # default: efficientnet_lite0 (image), all-MiniLM-L6-v2 (text)
    weights: str | None = None         # local weights file / Hugging Face folder of the backbone
    image_size: int = 224
    lr: float | None = None            # default: 1e-3 for S1/S2 heads; S3: 1e-4 images (Adam), 5e-5 texts (AdamW)
    batch_size: int | None = None      # default: 128 for S1/S2, 32 for S3
    max_epochs: int | None = None      # default: 100 for S1/S2, 10 for S3 (early stopping usually ends sooner)
    patience: int | None = None        # epochs without a better validation accuracy; default 5 (S1/S2), 3 (S3)
    dropout: float = 0.3
    weight_decay: float = 0.01         # AdamW (texts) only
    seed: int = 0
    device: str | None = None          # default: CUDA when present, else CPU
    max_steps_per_epoch: int | None = None  # partial epochs, for measuring time per step
    workers: int = 2                   # S3 images: DataLoader processes decoding JPEGs
    progress: bool = True
    cross_fit: int | None = None       # K: also K fold modules for out-of-fold train features (cross_fit.py)
    # images: "crop" (the protocol's resize + center crop) or "pad" (the photo on a white square; preprocess.py).
    # S1/S2 then train over the store's pooled set made the same way, S3 and extraction transform images so.
    image_resize: str = "crop"

    def resolved(self) -> "FinetuneSettings":
        if self.modality not in DEFAULT_BACKBONES:
            raise ValueError(f"unknown modality {self.modality!r}; use image or text")
        strategy = check_strategy(self.strategy)
        if self.image_resize not in RESIZE_MODES:
            raise ValueError(f"unknown --image-resize {self.image_resize!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.modality == "text" and self.image_resize != "crop":
            raise ValueError(f"--image-resize {self.image_resize} applies to image modules; a text module reads no "
                             "images (leave --image-resize out)")
        heads = strategy in (1, 2)
        done = replace(
            self, strategy=strategy, backbone=self.backbone or DEFAULT_BACKBONES[self.modality],
            weights=str(Path(self.weights).resolve()) if self.weights else None,
            lr=self.lr or (1e-3 if heads else 1e-4 if self.modality == "image" else 5e-5),
            batch_size=self.batch_size or (128 if heads else 32),
            max_epochs=self.max_epochs or (100 if heads else 10),
            patience=self.patience or (5 if heads else 3),
            cross_fit=None if self.cross_fit is None else check_k(self.cross_fit),
        )
        return check_training_numbers(done)


# Settings that must match for a checkpoint to be resumed (max_epochs and patience may grow, device may change).
RESUME_KEYS = ("modality", "strategy", "backbone", "weights", "image_size", "lr", "batch_size", "dropout",
               "weight_decay", "seed", "max_steps_per_epoch", "cross_fit", "image_resize")


@dataclass
class FinetuneResult:
    out_dir: Path
    metrics: dict = field(default_factory=dict)


def finetune(manifest_path: str | Path, out_dir: str | Path, settings: FinetuneSettings, *,
             store_path: str | Path | None = None, backbone=None) -> FinetuneResult:
    """Train a module and save it in `out_dir` (model.safetensors, config.json, metrics.json).

    `backbone`: an already built backbone to use instead of creating `settings.backbone` (tests, notebooks).
    """
    settings = settings.resolved()
    manifest = Manifest.load(manifest_path)
    with training_processes(settings.device) as (device, ranks):
        if not settings.cross_fit:
            return _finetune(manifest, Path(out_dir), settings, device, ranks, store_path, backbone)

        def train_one(folder, fresh_backbone, held_out, extra):
            return _finetune(manifest, folder, settings, device, ranks, store_path, fresh_backbone,
                             held_out=held_out, extra=extra).metrics

        metrics = finetune_cross_fitted(manifest, Path(out_dir), settings, train_one, backbone)
        return FinetuneResult(Path(out_dir), metrics)


def _finetune(manifest: Manifest, out_dir: Path, settings: FinetuneSettings, device, ranks: Ranks,
              store_path, backbone, *, held_out: frozenset = frozenset(), extra: dict | None = None) -> FinetuneResult:
    """One module; `held_out`: training item ids it must not see (a cross-fit fold), `extra`: more config.json."""
    torch.manual_seed(settings.seed)  # the head's initial weights
    module = build_module(settings.modality, settings.strategy, len(manifest.classes), backbone=backbone,
                          name=settings.backbone if backbone is None else None, weights=settings.weights,
                          image_size=settings.image_size, dropout=settings.dropout,
                          image_resize=settings.image_resize if settings.modality == "image" else None)
    if backbone is not None:
        module.build.update(weights=settings.weights)
    if module.frozen:
        if store_path is None:
            raise ValueError(f"strategy {settings.strategy} trains over cached pooled features: pass --store STORE "
                             "(create it with `embed extract MANIFEST --store STORE`)")
        data = _cached_features(store_path, manifest, module)
        checkpoint_dir = None  # seconds of training: nothing worth resuming
    else:
        data = (ImageItems if settings.modality == "image" else TextItems)(manifest, module.backbone, settings, device)
        checkpoint_dir = out_dir
    if held_out:
        data.drop_train(held_out)
    if ranks.world > 1 and module.frozen:
        raise ValueError(f"strategy {settings.strategy} trains a small head over cached features in seconds; run it "
                         "as one process (torchrun is for strategy 3)")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = module.trainable_module()  # the head (S1/S2, fed pooled features) or the whole module
    fit_result = fit(model, data, settings, device, optimizer=_optimizer(model, settings),
                     clip=1.0 if settings.modality == "text" else None, checkpoint_dir=checkpoint_dir,
                     resume_keys=RESUME_KEYS, ranks=ranks)

    model.load_state_dict(fit_result.pop("best_state"))
    labels, predictions = predict(model, data.batches("test"), device)
    counts = module.parameter_counts()
    scores = classification_metrics(labels, predictions, n_classes=len(manifest.classes))
    metrics = {
        "modality": settings.modality, "strategy": settings.strategy, "backbone": module.backbone.name,
        "weights_id": module.backbone.weights_id, "manifest_sha256": manifest.sha256, "device": str(device),
        "test_accuracy": scores["accuracy"], "test_macro_f1": scores["macro_f1"],
        "trainable_parameters": counts["trainable"], "non_trainable_parameters": counts["non_trainable"],
        "items": data.counts(), "processes": ranks.world, **fit_result,
    }
    if ranks.rank != 0:
        return FinetuneResult(out_dir, metrics)  # only rank 0 writes
    module.cpu().save(out_dir, classes=manifest.classes, manifest_sha256=manifest.sha256,
                      extra={"settings": asdict(settings), **(extra or {}),
                             "metrics": {k: v for k, v in metrics.items() if k != "history"}},
                      extra_files={"metrics.json": json.dumps(metrics, indent=1, sort_keys=True) + "\n"})
    return FinetuneResult(out_dir, metrics)


def _cached_features(store_path, manifest: Manifest, module: TransferModule) -> CachedFeatures:
    with FeatureStore(store_path) as store:
        if store.manifest_sha256 != manifest.sha256:
            raise ValueError(f"{store_path} was built from another manifest (sha256 {store.manifest_sha256[:12]}…, "
                             f"this one {manifest.sha256[:12]}…); pass the store extracted from this manifest")
        name = pooled_set_for(store, module.backbone)
        loaded = store.load([name])
    return CachedFeatures(loaded.features[name], loaded.labels, loaded.split, loaded.ids)


# ----------------------------------------------------------------------------------------------- the data
# Each source yields (inputs, labels) batches on the CPU: inputs are pooled features (B, D), images
# (B, 3, H, W) or a dict of (B, 30) token tensors; labels (B,) int64.


class CachedFeatures:
    """S1/S2: the store's pooled features, in memory ((N, D) float32 is small next to the backbone)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, split: np.ndarray, ids: np.ndarray):
        self.x = {s: torch.from_numpy(np.ascontiguousarray(features[split == s])) for s in SPLITS}  # (n, D)
        self.y = {s: torch.from_numpy(labels[split == s].astype(np.int64)) for s in SPLITS}  # (n,)
        self.train_ids = [str(i) for i in ids[split == "train"]]

    def drop_train(self, ids: frozenset) -> None:
        """Leave these training items out (a cross-fit fold module must never see its fold)."""
        keep = torch.tensor([i not in ids for i in self.train_ids], dtype=torch.bool)
        self.x["train"], self.y["train"] = self.x["train"][keep], self.y["train"][keep]
        self.train_ids = [i for i in self.train_ids if i not in ids]

    def counts(self) -> dict:
        return {s: len(self.y[s]) for s in SPLITS}

    def train_size(self) -> int:
        return len(self.y["train"])

    def train_batches(self, batch_size: int, sampler: DistributedSampler, generator: torch.Generator):
        order = torch.tensor(list(sampler), dtype=torch.int64)  # one process: randperm seeded (seed, epoch)
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            yield self.x["train"][index], self.y["train"][index]

    def batches(self, split: str):
        for begin in range(0, len(self.y[split]), 1024):
            yield self.x[split][begin : begin + 1024], self.y[split][begin : begin + 1024]


class ImageItems:
    """S3 images: decoded and transformed in DataLoader workers (random flip for training); bad images skipped
    and counted, as extraction does."""

    def __init__(self, manifest: Manifest, backbone, settings: FinetuneSettings, device):
        self.catalog, self.settings = manifest.open_catalog(), settings
        self.refs = [item.image for item in manifest.items]
        self.ids = [item.id for item in manifest.items]
        self.labels = manifest.labels()  # (N,)
        self.rows = {s: np.array([i for i, item in enumerate(manifest.items) if item.split == s]) for s in SPLITS}
        self.transforms = {True: backbone.image_transform(train=True), False: backbone.image_transform(train=False)}
        self.resize = shorter_side(backbone.preprocessing)  # None for a "pad" backbone: nothing to refuse
        self.pin = device.type == "cuda"
        self.skipped = dict.fromkeys(SPLITS, 0)

    def drop_train(self, ids: frozenset) -> None:
        self.rows["train"] = np.array([row for row in self.rows["train"] if self.ids[row] not in ids], dtype=np.int64)

    def counts(self) -> dict:
        return {s: len(self.rows[s]) - self.skipped[s] for s in SPLITS} | {
            f"skipped {s}": n for s, n in self.skipped.items() if n}

    def train_size(self) -> int:
        return len(self.rows["train"])

    def _loader(self, split: str, batch_size: int, sampler=None, generator=None):
        """Yields (manifest rows (n_ok,), images (n_ok, 3, H, W)) of the readable images."""
        dataset = ImageRows(self.catalog, self.refs, self.rows[split], self.transforms[split == "train"],
                            resize=self.resize)
        workers = self.settings.workers
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                            num_workers=workers, collate_fn=collate_images, pin_memory=self.pin,
                            prefetch_factor=2 if workers else None)
        bad = 0
        for rows, images, status in loader:
            bad += int((status != STATUS_OK).sum())
            if images is not None:
                yield rows[status == STATUS_OK], images
        if split != "train":
            self.skipped[split] = bad  # a full pass over the split: the exact count

    def _with_labels(self, batches):
        for rows, images in batches:
            yield images, torch.from_numpy(self.labels[rows])

    def train_batches(self, batch_size: int, sampler: DistributedSampler, generator: torch.Generator):
        # the sampler picks this process's share of the epoch; the generator seeds the workers (flips)
        return self._with_labels(self._loader("train", batch_size, sampler, generator))

    def batches(self, split: str):
        return self._with_labels(self._loader(split, self.settings.batch_size * 2))


class TextItems:
    """S3 texts: titles tokenized per batch in the main process (fast); empty titles skipped and counted."""

    def __init__(self, manifest: Manifest, backbone, settings: FinetuneSettings, device):
        self.tokenize = backbone.tokenize
        labels = manifest.labels()
        usable = [bool(clean_title(item.title)) for item in manifest.items]
        self.titles, self.y, self.skipped, self.ids = {}, {}, {}, {}
        for s in SPLITS:
            rows = [i for i, item in enumerate(manifest.items) if item.split == s and usable[i]]
            self.titles[s] = [manifest.items[i].title for i in rows]
            self.ids[s] = [manifest.items[i].id for i in rows]
            self.y[s] = torch.from_numpy(labels[rows]) if rows else torch.zeros(0, dtype=torch.int64)
            self.skipped[s] = sum(1 for item, ok in zip(manifest.items, usable) if item.split == s and not ok)

    def drop_train(self, ids: frozenset) -> None:
        keep = [n for n, item in enumerate(self.ids["train"]) if item not in ids]
        self.titles["train"] = [self.titles["train"][n] for n in keep]
        self.ids["train"] = [self.ids["train"][n] for n in keep]
        self.y["train"] = self.y["train"][torch.tensor(keep, dtype=torch.int64)]

    def counts(self) -> dict:
        return {s: len(self.y[s]) for s in SPLITS} | {f"skipped {s}": n for s, n in self.skipped.items() if n}

    def train_size(self) -> int:
        return len(self.y["train"])

    def train_batches(self, batch_size: int, sampler: DistributedSampler, generator: torch.Generator):
        order = list(sampler)
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            yield self.tokenize([self.titles["train"][i] for i in index]), self.y["train"][index]

    def batches(self, split: str):
        for begin in range(0, len(self.y[split]), 256):
            yield self.tokenize(self.titles[split][begin : begin + 256]), self.y[split][begin : begin + 256]


# ----------------------------------------------------------------------------------------------- optimizer


def _optimizer(model: nn.Module, settings: FinetuneSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.modality == "image":
        return torch.optim.Adam(params, lr=settings.lr)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
