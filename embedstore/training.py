"""The training loop shared by modules (embedstore/finetune.py, S1/S2/S3) and end-to-end models
(heads/end_to_end.py, 3-A/3-B): `fit` (cross-entropy, early stopping on validation accuracy), `predict`,
checkpoints with resume, and the processes under torchrun (`training_processes`, `Ranks`, samplers).

Resuming: after every epoch the last weights and the optimizer state go to `checkpoint.safetensors`, the
scalars (epoch, early-stopping state, history) to `checkpoint.json`, and the best weights so far to
`best.safetensors`. Every epoch reseeds from (seed, epoch), so a resumed run draws the same batches, flips and
dropout masks as an uninterrupted one and ends with the same weights.

Several processes: under `torchrun` (WORLD_SIZE > 1) the model trains in torch's DistributedDataParallel
(nccl on CUDA, one GPU per process; gloo on CPU) and each process draws its share of every epoch from a
DistributedSampler; only rank 0 writes checkpoints and results. One process draws its batches from the same
sampler (num_replicas=1: the permutation it always used), so R processes x batch b see exactly the batches of
one process x batch R*b. Every process evaluates the whole validation split on identical weights (batch-norm
buffers broadcast from rank 0 first), so all take the same early-stopping decisions without talking.
Metrics come from embedstore/metrics.py; the device and autocast from embedstore/defaults.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from embedstore.defaults import autocast_for, resolve_device
from embedstore.metrics import accuracy
from embedstore.model_folder import saving
from embedstore.outputs import partial_file, write_text_atomic

CHECKPOINT, CHECKPOINT_STATE, BEST = "checkpoint.safetensors", "checkpoint.json", "best.safetensors"


def check_training_numbers(settings):
    """The checks every training loop's settings share (modules in finetune.py, end-to-end models in heads/)."""
    for name in ("lr", "batch_size", "max_epochs", "patience"):
        if getattr(settings, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(settings, name)}")
    if not 0 <= settings.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {settings.dropout}")
    if settings.max_steps_per_epoch is not None and settings.max_steps_per_epoch <= 0:
        raise ValueError(f"max_steps_per_epoch must be positive, got {settings.max_steps_per_epoch}")
    return settings


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


def _to(inputs, device):
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------- the loop


def fit(model: nn.Module, data, settings, device, *, optimizer: torch.optim.Optimizer, clip: float | None,
        checkpoint_dir: Path | None, resume_keys: tuple[str, ...], ranks: Ranks = Ranks(),
        precision: str | None = None) -> dict:
    """Train `model` (inputs -> logits (B, C)) with cross-entropy and early stopping on validation accuracy.

    `data`: train_size(), train_batches(batch_size, sampler, generator), batches(split) of (inputs, labels).
    `settings`: a dataclass with seed, batch_size, max_epochs, patience, max_steps_per_epoch, progress.
    `precision`: "bf16" | "fp32" autocast; None: the device's default (bf16 on CUDA, fp32 on a CPU).
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
            with autocast_for(device, precision):
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
        labels, predictions = predict(model, data.batches("val"), device, precision=precision)
        val_accuracy = accuracy(labels, predictions)
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
def predict(model: nn.Module, batches, device, *, precision: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), predicted classes (n,)) over `batches` of (inputs, labels); `precision` as in `fit`."""
    model.eval()
    labels, predictions = [], []
    for inputs, batch_labels in batches:
        with autocast_for(device, precision):
            logits = model(_to(inputs, device))  # (B, C)
        predictions.append(logits.float().argmax(dim=1).cpu().numpy())
        labels.append(batch_labels.numpy())
    if not labels:
        raise ValueError("no usable items in this split; check the manifest and the store's skipped items")
    return np.concatenate(labels), np.concatenate(predictions)


# ----------------------------------------------------------------------------------------------- checkpoints


def _save_tensors(path: Path, tensors: dict, epoch: int) -> None:
    # a full disk: one line naming the checkpoint, not a SafetensorError traceback
    with saving(path), partial_file(path) as partial:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial),
                  metadata={"epoch": str(epoch)})


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
    with saving(folder / CHECKPOINT_STATE):
        write_text_atomic(folder / CHECKPOINT_STATE, json.dumps(record, indent=1, sort_keys=True))


def _load_checkpoint(folder: Path, model: nn.Module, optimizer, settings, device, resume_keys: tuple[str, ...]):
    record = json.loads((folder / CHECKPOINT_STATE).read_text())
    for key in resume_keys:
        # a setting added after the checkpoint was written reads as its default (the class attribute's value)
        recorded = record["settings"].get(key, getattr(type(settings), key, None))
        if recorded != getattr(settings, key):
            raise ValueError(f"{folder} holds a checkpoint made with {key}={recorded!r}, not "
                             f"{getattr(settings, key)!r}; use the same settings to resume, or another --out")
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
