"""Fusion heads over the store vs end-to-end training of the same fusion model, in one run, on the same data.

    python benchmarks/bench_end_to_end.py --manifest runs/real/manifest.json --store runs/real/store.h5

Head side: the 2-A head (per-modality 500-d layers + fusion head, concat by default) over the store's pooled
features, trained to early stopping with the sweep's defaults; several seeds in one stack (as `heads sweep`
does) and one head alone. End-to-end side: 3-A with the same operator and the backbones named in the store's
provenance, trained by heads/end_to_end.py for a few steps per epoch over the full training split (val and test
cut to a few items so the CPU is not spent on them); the full epoch's time is extrapolated from the last
epoch's steps (the first pays for start-up). Extraction: measured on the manifest's first items with the same
backbones, extrapolated to the whole manifest. Image S3 (`embed finetune --modality image --strategy 3`, the
store's image backbone fine-tuned end to end) is timed the same way, against the same head epoch. Prints each
time, the ratios, after how many head trainings the store has paid for itself, and the command line.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.extract import extract  # noqa: E402
from embedstore.extract_plan import ExtractSettings  # noqa: E402
from embedstore.finetune import FinetuneSettings, finetune  # noqa: E402
from embedstore.manifest import Manifest  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402
from heads.end_to_end import EndToEndSettings, backbones_of_store, train_end_to_end  # noqa: E402
from heads.models import HeadConfig  # noqa: E402
from heads.train import HeadData, TrainSettings, train_heads  # noqa: E402


def head_side(store_path: Path, fusion: str, seeds: list[int], device: str, precision: str) -> dict:
    with FeatureStore(store_path) as store:
        names = [store.find("image", "pooled"), store.find("text", "pooled")]
        loaded = store.load(names)
        classes = len(store.classes)
    data = HeadData.from_arrays([loaded.features[n] for n in names], loaded.labels, loaded.split, device)
    config = HeadConfig("2A", fusion, tuple(loaded.features[n].shape[1] for n in names), classes)
    settings = TrainSettings(precision=precision)
    stack = train_heads(config, seeds, data, settings, batched=True)
    alone = train_heads(config, seeds[:1], data, settings, batched=False)[0]
    head_epochs = sum(r.epochs_run for r in stack)
    per_head_epoch = stack[0].group_seconds / head_epochs  # the stack's wall time over every head's epochs
    return {
        "config": config, "settings": settings, "train_items": int((loaded.split == "train").sum()),
        "stack_size": len(stack), "stack_seconds": stack[0].group_seconds, "head_epochs": head_epochs,
        "per_head_epoch": per_head_epoch,
        "per_head_to_best": per_head_epoch * float(np.mean([r.best_epoch for r in stack])),
        "per_head_training": stack[0].group_seconds / len(stack),
        "alone_epoch": alone.train_seconds / alone.epochs_run, "alone_to_best": alone.train_seconds
        * alone.best_epoch / alone.epochs_run, "alone_seconds": alone.train_seconds,
        "accuracy": [r.test_accuracy for r in stack], "best_epochs": [r.best_epoch for r in stack],
    }


def cut_manifest(manifest: Manifest, folder: Path, *, keep_eval: int) -> Path:
    """Every training item, only `keep_eval` val and test items: the epoch is full, the evaluation is not."""
    seen = {"train": 0, "val": 0, "test": 0}
    items = []
    for item in manifest.items:
        if item.split == "train" or seen[item.split] < keep_eval:
            items.append(item)
            seen[item.split] += 1
    path = folder / "manifest-cut.json"
    replace(manifest, items=items).save(path)
    return path


def end_to_end_side(manifest_path: Path, store_path: Path, args, folder: Path) -> dict:
    manifest = Manifest.load(manifest_path)
    with FeatureStore(store_path) as store:
        if store.manifest_sha256 != manifest.sha256:
            raise ValueError(f"{store_path} was not extracted from {manifest_path}; pass the store's manifest")
        settings, _ = backbones_of_store(store, EndToEndSettings(
            strategy="3A", fusion=args.fusion, batch_size=args.batch_size, max_epochs=2, patience=10,
            max_steps_per_epoch=args.end_to_end_steps, workers=args.workers, device=args.device, progress=False))
    metrics = train_end_to_end(cut_manifest(manifest, folder, keep_eval=args.batch_size), folder / "run",
                               settings).metrics
    last = metrics["history"][-1]
    per_step = last["train_seconds"] / last["steps"]
    return {"settings": settings, "per_step": per_step, "steps_per_epoch": metrics["steps_per_full_epoch"],
            "epoch": per_step * metrics["steps_per_full_epoch"], "history": metrics["history"],
            "parameters": metrics["trainable_parameters"]}


def image_s3_side(manifest_path: Path, settings: EndToEndSettings, args, folder: Path) -> dict:
    """Image S3 over the full training split for `--end-to-end-steps` steps per epoch, two epochs; the full
    epoch extrapolated from the last epoch's steps, like the end-to-end side."""
    manifest = Manifest.load(manifest_path)
    result = finetune(cut_manifest(manifest, folder, keep_eval=args.batch_size), folder / "image-s3", FinetuneSettings(
        modality="image", strategy=3, backbone=settings.image_backbone, image_size=settings.image_size,
        batch_size=args.batch_size, max_epochs=2, patience=10, max_steps_per_epoch=args.end_to_end_steps,
        workers=args.workers, device=args.device, progress=False))
    metrics = result.metrics
    last = metrics["history"][-1]
    per_step = last["train_seconds"] / last["steps"]
    return {"per_step": per_step, "steps_per_epoch": metrics["steps_per_full_epoch"],
            "epoch": per_step * metrics["steps_per_full_epoch"], "history": metrics["history"]}


def extraction_side(manifest_path: Path, settings: EndToEndSettings, items: int, workers: int, device,
                    folder: Path) -> dict:
    manifest = Manifest.load(manifest_path)
    subset = folder / "manifest-first.json"
    replace(manifest, items=manifest.items[:items]).save(subset)
    reports = extract(subset, folder / "store-first.h5", ExtractSettings(
        image_backbone=settings.image_backbone, text_backbone=settings.text_backbone, image_size=settings.image_size,
        text_weights=settings.text_weights, workers=workers, device=device, progress=False))
    seconds = sum(r.seconds for r in reports)
    return {"items": items, "seconds": seconds, "total_items": len(manifest.items),
            "estimate": seconds / items * len(manifest.items), "by_source": {r.name: r.seconds for r in reports}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, required=True, help="the manifest the store was extracted from")
    p.add_argument("--store", type=Path, required=True, help="a store with pooled image and text features")
    p.add_argument("--fusion", default="concat", help="fusion operator of both models (default concat)")
    p.add_argument("--seeds", type=int, default=3, help="heads trained in one stack, as heads sweep does")
    p.add_argument("--end-to-end-steps", type=int, default=2, help="measured steps per end-to-end epoch (2 epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="end-to-end batch (the project's S3 default)")
    p.add_argument("--extract-items", type=int, default=64, help="items whose extraction is timed")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="threads of the end-to-end side (default: torch's)")
    p.add_argument("--head-threads", type=int, default=1, help="threads of the head side (heads sweep's default)")
    p.add_argument("--precision", default="auto", help="of the head side: auto (fp32 on CPU), bf16, fp32")
    p.add_argument("--image-s3", action=argparse.BooleanOptionalAction, default=True,
                   help="also time image S3 (the store's image backbone fine-tuned) against the head epoch")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    threads = torch.get_num_threads()
    torch.set_num_threads(args.head_threads)
    heads = head_side(args.store, args.fusion, list(range(args.seeds)), device, args.precision)
    torch.set_num_threads(threads)
    s = heads["settings"]
    print(f"\nhead 2A-{args.fusion} over the store ({heads['train_items']} training items, batch {s.batch_size}, "
          f"lr {s.lr}, patience {s.patience}, {args.head_threads} thread(s), precision {s.precision}):")
    print(f"  {heads['stack_size']} heads in one stack: {heads['stack_seconds']:.2f} s for {heads['head_epochs']} "
          f"head-epochs -> {heads['per_head_epoch'] * 1000:.1f} ms per head per epoch (validation included)")
    print(f"  best epochs {heads['best_epochs']}, test accuracy {', '.join(f'{a:.4f}' for a in heads['accuracy'])}")
    print(f"  per head: {heads['per_head_to_best']:.2f} s to the best validation epoch, "
          f"{heads['per_head_training']:.2f} s to early stopping")
    print(f"  one head alone: {heads['alone_epoch'] * 1000:.1f} ms per epoch, {heads['alone_to_best']:.2f} s to its "
          f"best epoch, {heads['alone_seconds']:.2f} s in all")

    with tempfile.TemporaryDirectory() as tmp:
        e2e = end_to_end_side(args.manifest, args.store, args, Path(tmp))
        es = e2e["settings"]
        print(f"\nend to end 3A-{args.fusion}: {es.image_backbone} ({es.image_size} px) + {es.text_backbone}, "
              f"{e2e['parameters']:,} trainable parameters, batch {es.batch_size}, AdamW lr {es.lr}:")
        for h in e2e["history"]:
            print(f"  epoch {h['epoch']}: {h['steps']} steps in {h['train_seconds']:.2f} s")
        print(f"  {e2e['per_step']:.2f} s per step (last epoch) x {e2e['steps_per_epoch']} steps = "
              f"{e2e['epoch']:.0f} s per epoch (EXTRAPOLATED from {e2e['history'][-1]['steps']} measured steps)")
        print(f"  time to the best validation epoch: at least one epoch = {e2e['epoch']:.0f} s (lower bound; "
              "not trained to convergence here)")
        s3 = None
        if args.image_s3:
            s3 = image_s3_side(args.manifest, es, args, Path(tmp))
            print(f"\nimage S3 ({es.image_backbone}, {es.image_size} px, batch {args.batch_size}): "
                  + ", ".join(f"epoch {h['epoch']}: {h['steps']} steps in {h['train_seconds']:.2f} s"
                              for h in s3["history"]))
            print(f"  {s3['per_step']:.3f} s per step (last epoch) x {s3['steps_per_epoch']} steps = "
                  f"{s3['epoch']:.1f} s per epoch (EXTRAPOLATED from {s3['history'][-1]['steps']} measured steps)")
        ext = extraction_side(args.manifest, es, args.extract_items, args.workers, device, Path(tmp))
    print(f"\nextraction (one-off): {ext['items']} items in {ext['seconds']:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in ext['by_source'].items())}) -> about {ext['estimate']:.0f} s "
          f"for all {ext['total_items']} items (extrapolated)")

    ratio_epoch = e2e["epoch"] / heads["per_head_epoch"]
    if s3 is not None:
        print(f"\nratio per epoch, image S3 / head in a stack: {s3['epoch'] / heads['per_head_epoch']:,.0f}x "
              f"(issue 13's GPU target >= 1,000x); / one head alone: {s3['epoch'] / heads['alone_epoch']:,.0f}x")
    print(f"\nratio per epoch, end to end / head in a stack: {ratio_epoch:,.0f}x (target >= 5,000x: "
          f"{'met' if ratio_epoch >= 5000 else 'NOT met'}); / one head alone: {e2e['epoch'] / heads['alone_epoch']:,.0f}x")
    print(f"ratio of time to the best validation epoch (end to end's lower bound / head in a stack): "
          f"{e2e['epoch'] / heads['per_head_to_best']:,.0f}x or more")
    head_cost, e2e_cost = heads["per_head_training"], e2e["epoch"]
    n = math.ceil(ext["estimate"] / (e2e_cost - head_cost)) if e2e_cost > head_cost else None
    print(f"break-even: extraction + n head trainings ({ext['estimate']:.0f} s + n x {head_cost:.2f} s) < n end-to-end "
          f"trainings (n x >= {e2e_cost:.0f} s) from n = {n} on (each end-to-end training counted as one epoch, "
          "so the real n is at most this)")


if __name__ == "__main__":
    main()
