"""`embed finetune`: train an image or text module with transfer strategy 1, 2 or 3 (embedstore/finetune.py)."""
from __future__ import annotations

from pathlib import Path

import click

from cli.common import (DEVICE_DEFAULT, NON_NEGATIVE, POSITIVE, FiniteFloat, InputError, one_line_errors,
                        setting_option)

# The columns of the paper's Tables 3/4, in order.
TABLE_COLUMNS = (("test accuracy", "test_accuracy", "{:.4f}"), ("macro-F1", "test_macro_f1", "{:.4f}"),
                 ("training time (s)", "training_seconds", "{:.1f}"), ("epochs", "epochs", "{}"),
                 ("trainable parameters", "trainable_parameters", "{:,}"),
                 ("non-trainable parameters", "non_trainable_parameters", "{:,}"))


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--modality", required=True, type=click.Choice(["image", "text"]),
              help="Which backbone the module is built on.")
@click.option("--strategy", required=True, type=click.Choice(["1", "2", "3"]),
              help="1: frozen backbone, classifier only; 2: frozen backbone, middle layer + classifier; "
                   "3: everything trained.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Folder for model.safetensors, config.json, metrics.json (and S3 checkpoints; rerun to resume).")
@click.option("--store", type=click.Path(path_type=Path), help="Feature store with the backbone's pooled features "
              "(strategies 1 and 2).")
@click.option("--backbone", default=None, show_default="efficientnet_lite0 for images, all-MiniLM-L6-v2 for texts",
              help="Backbone name.")
@click.option("--weights", type=click.Path(path_type=Path), help="Local backbone weights file / Hugging Face folder.")
@setting_option("--image-size", setting="embedstore.finetune:FinetuneSettings.image_size", type=POSITIVE, help="Center-crop size of images.")
@click.option("--epochs", type=POSITIVE, default=None, show_default="100 for S1/S2, 10 for S3", help="Most epochs.")
@click.option("--batch-size", type=POSITIVE, default=None, show_default="128 for S1/S2, 32 for S3",
              help="Items per training step.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=None,
              show_default="1e-3 for S1/S2; S3: 1e-4 images, 5e-5 texts", help="AdamW learning rate.")
@click.option("--patience", type=POSITIVE, default=None, show_default="5 for S1/S2, 3 for S3",
              help="Epochs without a better validation accuracy.")
@setting_option("--dropout", type=FiniteFloat(min=0, max=1, max_open=True), setting="embedstore.finetune:FinetuneSettings.dropout",
              help="Dropout between the module's middle layer and its classifier.")
@setting_option("--seed", type=NON_NEGATIVE, setting="embedstore.finetune:FinetuneSettings.seed", help="Seed of the initial weights and the batch order.")
@click.option("--device", default=None, show_default=DEVICE_DEFAULT, help="cpu, cuda or cuda:N.")
@click.option("--max-steps-per-epoch", type=POSITIVE, default=None,
              help="Stop each epoch after this many steps (measures time per step; the full epoch is extrapolated).")
@setting_option("--workers", setting="embedstore.finetune:FinetuneSettings.workers", type=NON_NEGATIVE, help="DataLoader processes decoding images (S3).")
@click.option("--cross-fit", "cross_fit", type=int, default=None, metavar="K",
              help="Also train K fold modules (K >= 2; stratified folds drawn from --seed), fold k without the "
                   "training items of fold k, in OUT/folds/: `embed extract --image-module/--text-module` then "
                   "gives each training row the features of the fold module that never saw it (out-of-fold "
                   "features for 1-A/1-B heads), validation and test rows those of the usual module. K+1 trainings: "
                   "seconds for S1/S2, K+1 full fine-tunings for S3. Rerun to resume: finished folds are kept.")
@setting_option("--image-resize", type=click.Choice(["crop", "pad"]), setting="embedstore.finetune:FinetuneSettings.image_resize",
                help="Image modules: crop (the protocol's resize + center crop) or pad (the whole photo on a white "
                     "square). S1/S2 read the store's pooled features made the same way (`embed extract "
                     "--image-resize`); S3 trains on, and extraction of the module uses, this transform.")
@setting_option("--progress/--no-progress", setting="embedstore.finetune:FinetuneSettings.progress", help="Progress bars on stderr.")
@one_line_errors
def finetune(manifest, modality, strategy, out, store, backbone, weights, image_size, epochs, batch_size, lr,
             patience, dropout, seed, device, max_steps_per_epoch, workers, cross_fit, image_resize, progress):
    """Train a MANIFEST module with a transfer strategy; print the columns of the paper's Tables 3/4."""
    from embedstore.finetune import FinetuneSettings, finetune as run_finetune

    if strategy in ("1", "2") and store is None:
        raise InputError(f"strategy {strategy} trains over cached pooled features: pass --store STORE "
                         f"(create it with `embed extract {manifest} --store STORE`)")
    settings = FinetuneSettings(
        modality=modality, strategy=int(strategy), backbone=backbone, weights=str(weights) if weights else None,
        image_size=image_size, lr=lr, batch_size=batch_size, max_epochs=epochs, patience=patience,
        dropout=dropout, seed=seed, device=device, max_steps_per_epoch=max_steps_per_epoch, workers=workers,
        progress=progress, cross_fit=cross_fit, image_resize=image_resize,
    )
    result = run_finetune(manifest, out, settings, store_path=store)
    metrics = result.metrics
    if metrics.get("resumed_from_epoch"):
        click.echo(f"resumed after epoch {metrics['resumed_from_epoch']}")
    click.echo(f"{modality} S{strategy} {metrics['backbone']} (best epoch {metrics['best_epoch']}, "
               f"val accuracy {metrics['best_val_accuracy']:.4f}, items {_counts(metrics['items'])})")
    for title, key, fmt in TABLE_COLUMNS:
        click.echo(f"  {title}: {fmt.format(metrics[key])}")
    if "estimated_full_epoch_seconds" in metrics:
        click.echo(f"  partial epochs of {max_steps_per_epoch} steps: {metrics['seconds_per_step']:.3f} s/step, "
                   f"about {metrics['estimated_full_epoch_seconds']:.0f} s of training per full epoch of "
                   f"{metrics['steps_per_full_epoch']} steps (extrapolated)")
    for fold in metrics.get("cross_fit", {}).get("folds", []):
        state = "kept (finished before)" if fold["kept"] else "trained"
        click.echo(f"  fold {fold['fold']}: {state}, val accuracy {fold['best_val_accuracy']:.4f}, "
                   f"items {_counts(fold['items'])}")
    click.echo(f"wrote {out}/model.safetensors, config.json, metrics.json"
               + (f" and {metrics['cross_fit']['k']} fold modules in {out}/folds/" if "cross_fit" in metrics else ""))


def _counts(counts: dict) -> str:
    """{"train": 175, "val": 25} -> "train: 175, val: 25" (not a Python dict in what people read)."""
    return ", ".join(f"{name}: {n:,}" if isinstance(n, int) else f"{name}: {n}" for name, n in counts.items())
