"""`embed finetune`: train an image or text module with transfer strategy 1, 2 or 3.

S1 and S2 keep the backbone frozen, so they train the head over the store's cached pooled features (seconds,
no backbone pass). S3 trains everything on the raw catalog through the manifest (images: Adam + random
horizontal flip, decoded in DataLoader workers; texts: AdamW + gradient clipping at 1.0). S1/S2 use their
modality's optimizer too, so the three strategies differ only in what they train. All: cross-entropy, early
stopping on validation accuracy, test accuracy and macro-F1 at the best validation epoch.

Resuming (S3): after every epoch the last weights and the optimizer state go to `checkpoint.safetensors`,
the scalars (epoch, early-stopping state, history) to `checkpoint.json`, and the best weights so far to
`best.safetensors`. Every epoch reseeds from (seed, epoch), so a resumed run draws the same batches, flips and
dropout masks as an uninterrupted one and ends with the same weights.

Several processes (S3): under `torchrun` (WORLD_SIZE > 1) the model trains in torch's DistributedDataParallel
(nccl on CUDA, one GPU per process; gloo on CPU) and each process draws its share of every epoch from a
DistributedSampler; only rank 0 writes checkpoints and results. One process draws its batches from the same
sampler (num_replicas=1: the permutation it always used), so R processes x batch b see exactly the batches of
one process x batch R*b. Every process evaluates the whole validation split on identical weights (batch-norm
buffers broadcast from rank 0 first), so all take the same early-stopping decisions without talking.
`fit`, `predict` and `training_processes` are shared with end-to-end training (heads/end_to_end.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import accuracy_score, f1_score
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from embedstore.extract import STATUS_OK, _collate_images, _ImageRows, autocast_for, resolve_device
from embedstore.manifest import SPLITS, Manifest
from embedstore.preprocess import clean_title
from embedstore.modules import TransferModule, build_module, check_strategy, pooled_set_for
from embedstore.store import FeatureStore

DEFAULT_BACKBONES = {"image": "efficientnet_lite0", "text": "all-MiniLM-L6-v2"}
CHECKPOINT, CHECKPOINT_STATE, BEST = "checkpoint.safetensors", "checkpoint.json", "best.safetensors"


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

    def resolved(self) -> "FinetuneSettings":
        if self.modality not in DEFAULT_BACKBONES:
            raise ValueError(f"unknown modality {self.modality!r}; use image or text")
        strategy = check_strategy(self.strategy)
        heads = strategy in (1, 2)
        done = replace(
            self, strategy=strategy, backbone=self.backbone or DEFAULT_BACKBONES[self.modality],
            weights=str(Path(self.weights).resolve()) if self.weights else None,
            lr=self.lr or (1e-3 if heads else 1e-4 if self.modality == "image" else 5e-5),
            batch_size=self.batch_size or (128 if heads else 32),
            max_epochs=self.max_epochs or (100 if heads else 10),
            patience=self.patience or (5 if heads else 3),
        )
        return check_training_numbers(done)


def check_training_numbers(settings):
    """The checks every training loop's settings share (modules here, end-to-end models in heads/)."""
    for name in ("lr", "batch_size", "max_epochs", "patience"):
        if getattr(settings, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(settings, name)}")
    if not 0 <= settings.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {settings.dropout}")
    if settings.max_steps_per_epoch is not None and settings.max_steps_per_epoch <= 0:
        raise ValueError(f"max_steps_per_epoch must be positive, got {settings.max_steps_per_epoch}")
    return settings


# Settings that must match for a checkpoint to be resumed (max_epochs and patience may grow, device may change).
RESUME_KEYS = ("modality", "strategy", "backbone", "weights", "image_size", "lr", "batch_size", "dropout",
               "weight_decay", "seed", "max_steps_per_epoch")


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
        return _finetune(manifest, Path(out_dir), settings, device, ranks, store_path, backbone)


def _finetune(manifest: Manifest, out_dir: Path, settings: FinetuneSettings, device, ranks: "Ranks",
              store_path, backbone) -> FinetuneResult:
    torch.manual_seed(settings.seed)  # the head's initial weights
    module = build_module(settings.modality, settings.strategy, len(manifest.classes), backbone=backbone,
                          name=settings.backbone if backbone is None else None, weights=settings.weights,
                          image_size=settings.image_size, dropout=settings.dropout)
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
    metrics = {
        "modality": settings.modality, "strategy": settings.strategy, "backbone": module.backbone.name,
        "weights_id": module.backbone.weights_id, "manifest_sha256": manifest.sha256, "device": str(device),
        "test_accuracy": float(accuracy_score(labels, predictions)),
        "test_macro_f1": float(f1_score(labels, predictions, average="macro",
                                        labels=list(range(len(manifest.classes))), zero_division=0)),
        "trainable_parameters": counts["trainable"], "non_trainable_parameters": counts["non_trainable"],
        "items": data.counts(), "processes": ranks.world, **fit_result,
    }
    if ranks.rank != 0:
        return FinetuneResult(out_dir, metrics)  # only rank 0 writes
    module.cpu().save(out_dir, classes=manifest.classes, manifest_sha256=manifest.sha256,
                      extra={"settings": asdict(settings), "metrics": {k: v for k, v in metrics.items()
                                                                       if k != "history"}},
                      extra_files={"metrics.json": json.dumps(metrics, indent=1, sort_keys=True) + "\n"})
    return FinetuneResult(out_dir, metrics)


def _cached_features(store_path, manifest: Manifest, module: TransferModule) -> CachedFeatures:
    with FeatureStore(store_path) as store:
        if store.manifest_sha256 != manifest.sha256:
            raise ValueError(f"{store_path} was built from another manifest (sha256 {store.manifest_sha256[:12]}…, "
                             f"this one {manifest.sha256[:12]}…); pass the store extracted from this manifest")
        name = pooled_set_for(store, module.backbone)
        loaded = store.load([name])
    return CachedFeatures(loaded.features[name], loaded.labels, loaded.split)


# ----------------------------------------------------------------------------------------------- the data
# Each source yields (inputs, labels) batches on the CPU: inputs are pooled features (B, D), images
# (B, 3, H, W) or a dict of (B, 30) token tensors; labels (B,) int64.


class CachedFeatures:
    """S1/S2: the store's pooled features, in memory ((N, D) float32 is small next to the backbone)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, split: np.ndarray):
        self.x = {s: torch.from_numpy(np.ascontiguousarray(features[split == s])) for s in SPLITS}  # (n, D)
        self.y = {s: torch.from_numpy(labels[split == s].astype(np.int64)) for s in SPLITS}  # (n,)

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
        self.labels = manifest.labels()  # (N,)
        self.rows = {s: np.array([i for i, item in enumerate(manifest.items) if item.split == s]) for s in SPLITS}
        self.transforms = {True: backbone.image_transform(train=True), False: backbone.image_transform(train=False)}
        self.pin = device.type == "cuda"
        self.skipped = dict.fromkeys(SPLITS, 0)

    def counts(self) -> dict:
        return {s: len(self.rows[s]) - self.skipped[s] for s in SPLITS} | {
            f"skipped {s}": n for s, n in self.skipped.items() if n}

    def train_size(self) -> int:
        return len(self.rows["train"])

    def _loader(self, split: str, batch_size: int, sampler=None, generator=None):
        """Yields (manifest rows (n_ok,), images (n_ok, 3, H, W)) of the readable images."""
        dataset = _ImageRows(self.catalog, self.refs, self.rows[split], self.transforms[split == "train"])
        workers = self.settings.workers
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                            num_workers=workers, collate_fn=_collate_images, pin_memory=self.pin,
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
        self.titles, self.y, self.skipped = {}, {}, {}
        for s in SPLITS:
            rows = [i for i, item in enumerate(manifest.items) if item.split == s and usable[i]]
            self.titles[s] = [manifest.items[i].title for i in rows]
            self.y[s] = torch.from_numpy(labels[rows]) if rows else torch.zeros(0, dtype=torch.int64)
            self.skipped[s] = sum(1 for item, ok in zip(manifest.items, usable) if item.split == s and not ok)

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


# ----------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1


@contextlib.contextmanager
def training_processes(device_name: str | None):
    """Yields (device, Ranks). Under torchrun (WORLD_SIZE > 1) it joins the process group (nccl on CUDA with
    one GPU per process, gloo on CPU) unless the caller already did, and leaves what it created."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device, Ranks()
        return
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device, Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        if created:
            dist.destroy_process_group()


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seeds everything random in one epoch (shuffle, dropout, flips, worker seeds) from (seed, epoch) alone."""
    torch.manual_seed(seed * 1_000_003 + epoch)
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _train_sampler(data, settings, ranks: Ranks, epoch: int) -> DistributedSampler:
    """This process's share of the epoch; with one process the same randperm as _seed_epoch's generator."""
    sampler = DistributedSampler(range(data.train_size()), num_replicas=ranks.world, rank=ranks.rank, shuffle=True,
                                 seed=settings.seed * 1_000_003)
    sampler.set_epoch(epoch)
    return sampler


def _optimizer(model: nn.Module, settings: FinetuneSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.modality == "image":
        return torch.optim.Adam(params, lr=settings.lr)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def _to(inputs, device):
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------- the loop


def fit(model: nn.Module, data, settings, device, *, optimizer: torch.optim.Optimizer, clip: float | None,
        checkpoint_dir: Path | None, resume_keys: tuple[str, ...], ranks: Ranks = Ranks()) -> dict:
    """Train `model` (inputs -> logits (B, C)) with cross-entropy and early stopping on validation accuracy.

    `data`: train_size(), train_batches(batch_size, sampler, generator), batches(split) of (inputs, labels).
    `settings`: a dataclass with seed, batch_size, max_epochs, patience, max_steps_per_epoch, progress.
    Returns the training summary with "best_state" (the best epoch's weights)."""
    model = model.to(device)
    net = model
    if ranks.world > 1:  # gradients averaged over the processes inside backward()
        # find_unused_parameters: e.g. BERT's pooler takes no part in the loss and gets no gradient
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)
    state = {"epoch": 0, "best_val_accuracy": -1.0, "best_epoch": 0, "since_best": 0, "stopped_early": False,
             "train_seconds": 0.0, "history": []}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    resumed_from = 0
    if checkpoint_dir is not None and (checkpoint_dir / CHECKPOINT_STATE).is_file():
        state, best_state = _load_checkpoint(checkpoint_dir, model, optimizer, settings, device, resume_keys)
        resumed_from = state["epoch"]
    writer = checkpoint_dir if ranks.rank == 0 else None  # only rank 0 writes
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = -(-len(_train_sampler(data, settings, ranks, 0)) // settings.batch_size)
    for epoch in range(state["epoch"] + 1, settings.max_epochs + 1):
        if state["since_best"] >= settings.patience:  # a resumed run may raise the patience to go on
            break
        generator = _seed_epoch(settings.seed, epoch)
        net.train()
        start, steps, loss_sum = time.perf_counter(), 0, 0.0
        limit = min(steps_per_epoch, settings.max_steps_per_epoch or steps_per_epoch)
        batches = tqdm(data.train_batches(settings.batch_size, _train_sampler(data, settings, ranks, epoch),
                                          generator),
                       total=limit, leave=False, desc=f"epoch {epoch}", disable=not settings.progress or ranks.rank)
        for inputs, labels in batches:
            with autocast_for(device):
                logits = net(_to(inputs, device))  # (B, C)
            loss = loss_fn(logits.float(), labels.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            steps, loss_sum = steps + 1, loss_sum + float(loss.detach())
            if steps >= limit:
                break
        batches.close()
        seconds = time.perf_counter() - start
        if ranks.world > 1:
            total = torch.tensor([loss_sum], dtype=torch.float64, device=device)
            dist.all_reduce(total)  # the epoch's loss over every process's items
            loss_sum = float(total) / ranks.world
            for buffer in model.buffers():  # batch-norm statistics moved per process in the last step: rank 0's
                dist.broadcast(buffer, 0)
        labels, predictions = predict(model, data.batches("val"), device)
        val_accuracy = float(accuracy_score(labels, predictions))
        state["train_seconds"] += seconds
        state["history"].append({"epoch": epoch, "train_loss": loss_sum / max(steps, 1), "val_accuracy": val_accuracy,
                                 "train_seconds": seconds, "steps": steps})
        state["epoch"] = epoch
        if val_accuracy > state["best_val_accuracy"]:
            state.update(best_val_accuracy=val_accuracy, best_epoch=epoch, since_best=0)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if writer is not None:
                _save_tensors(writer / BEST, best_state, epoch)
        else:
            state["since_best"] += 1
        state["stopped_early"] = state["since_best"] >= settings.patience
        if writer is not None:
            _save_checkpoint(writer, model, optimizer, state, settings)
    history = state["history"]
    steps_done = sum(h["steps"] for h in history)
    result = {
        "best_epoch": state["best_epoch"], "epochs": state["epoch"], "best_val_accuracy": state["best_val_accuracy"],
        "stopped_early": state["stopped_early"], "training_seconds": state["train_seconds"],
        "seconds_per_epoch": state["train_seconds"] / max(len(history), 1), "steps_per_full_epoch": steps_per_epoch,
        "resumed_from_epoch": resumed_from, "history": history, "best_state": best_state,
    }
    if settings.max_steps_per_epoch and settings.max_steps_per_epoch < steps_per_epoch and steps_done:
        # Partial epochs: the full epoch's training time is extrapolated from the measured steps (said so).
        result["seconds_per_step"] = state["train_seconds"] / steps_done
        result["estimated_full_epoch_seconds"] = result["seconds_per_step"] * steps_per_epoch
    return result


@torch.inference_mode()
def predict(model: nn.Module, batches, device) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), predicted classes (n,)) over `batches` of (inputs, labels)."""
    model.eval()
    labels, predictions = [], []
    for inputs, batch_labels in batches:
        with autocast_for(device):
            logits = model(_to(inputs, device))  # (B, C)
        predictions.append(logits.float().argmax(dim=1).cpu().numpy())
        labels.append(batch_labels.numpy())
    if not labels:
        raise ValueError("no usable items in this split; check the manifest and the store's skipped items")
    return np.concatenate(labels), np.concatenate(predictions)


# ----------------------------------------------------------------------------------------------- checkpoints


def _save_tensors(path: Path, tensors: dict, epoch: int) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial),
              metadata={"epoch": str(epoch)})
    os.replace(partial, path)


def _save_checkpoint(folder: Path, model: nn.Module, optimizer, state: dict, settings) -> None:
    """Tensors (weights, optimizer moments) in safetensors; everything else as JSON. Written before the JSON
    that names its epoch, so a kill between the two leaves the previous epoch's JSON, which is detected."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    scalars = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    _save_tensors(folder / CHECKPOINT, tensors, state["epoch"])
    record = {"state": state, "settings": asdict(settings), "optimizer_param_groups": optimizer_state["param_groups"],
              "optimizer_scalars": scalars}
    partial = folder / (CHECKPOINT_STATE + ".partial")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(partial, folder / CHECKPOINT_STATE)


def _load_checkpoint(folder: Path, model: nn.Module, optimizer, settings, device, resume_keys: tuple[str, ...]):
    record = json.loads((folder / CHECKPOINT_STATE).read_text())
    for key in resume_keys:
        if record["settings"].get(key) != getattr(settings, key):
            raise ValueError(f"{folder} holds a checkpoint made with {key}={record['settings'].get(key)!r}, not "
                             f"{getattr(settings, key)!r}; use the same settings to resume, or another --out")
    from safetensors import safe_open

    with safe_open(str(folder / CHECKPOINT), "pt") as f:
        saved_epoch = int(f.metadata().get("epoch", -1))
    if saved_epoch != record["state"]["epoch"]:
        raise ValueError(f"{folder}: {CHECKPOINT} is from epoch {saved_epoch} but {CHECKPOINT_STATE} says epoch "
                         f"{record['state']['epoch']} (interrupted while saving); delete both to start over")
    tensors = load_file(str(folder / CHECKPOINT), device=str(device))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    for key, value in record["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": record["optimizer_param_groups"]})
    best = load_file(str(folder / BEST), device=str(device)) if (folder / BEST).is_file() else None
    best = best or {k: v.detach().clone() for k, v in model.state_dict().items()}
    return record["state"], best
