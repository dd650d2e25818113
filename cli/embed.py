"""`embed`: catalogs, manifests and the feature store. Commands parse options and call one library function."""
from __future__ import annotations

from pathlib import Path

import click

from cli.common import one_line_errors, optional_name


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def embed():
    """Run image and text backbones once and keep their features in an HDF5 feature store."""


@embed.command()
@click.argument("catalog", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Manifest file to write (JSON).")
@click.option("--min-items", default=250, show_default=True, help="Keep classes with at least this many usable items.")
@click.option("--items-per-class", default=250, show_default=True, help="Items drawn from each kept class.")
@click.option("--train", default=175, show_default=True, help="Training items per class.")
@click.option("--val", default=25, show_default=True, help="Validation items per class.")
@click.option("--test", default=50, show_default=True, help="Test items per class.")
@click.option("--seed", default=0, show_default=True, help="Seed of the draw and the split.")
@click.option("--format", "fmt", type=click.Choice(["auto", "fashion", "csv"]), default="auto", show_default=True,
              help="fashion = styles.csv + images/ (folder or zip); csv = a generic catalog with named columns.")
@click.option("--id-column", default="id", show_default=True, help="Generic CSV: the id column.")
@click.option("--image-column", default="image", show_default=True, help="Generic CSV: image path column.")
@click.option("--title-column", default="title", show_default=True, help="Generic CSV: title column.")
@click.option("--label-column", default="label", show_default=True, help="Generic CSV: label column.")
@one_line_errors
def prepare(catalog, out, min_items, items_per_class, train, val, test, seed, fmt, id_column, image_column,
            title_column, label_column):
    """Under-sample and split CATALOG (folder, zip or CSV) into a manifest, saying what was dropped and why."""
    from embedstore.catalog import CsvColumns, open_catalog
    from embedstore.manifest import SplitSettings, format_summary, prepare_manifest

    columns = CsvColumns(id=id_column, image=image_column, title=title_column, label=label_column)
    opened = open_catalog(catalog, fmt=fmt, columns=columns)
    settings = SplitSettings(min_items=min_items, items_per_class=items_per_class, train=train, val=val,
                             test=test, seed=seed)
    manifest = prepare_manifest(opened, settings)
    manifest.save(out)
    click.echo(format_summary(manifest))
    click.echo(f"wrote {out} (sha256 {manifest.sha256[:16]})")


@embed.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--store", required=True, type=click.Path(path_type=Path), help="HDF5 feature store to create or resume.")
@click.option("--image-backbone", default="efficientnet_lite0", show_default=True,
              help="Image backbone name ('none' to skip images).")
@click.option("--text-backbone", default="all-MiniLM-L6-v2", show_default=True,
              help="Text backbone name or local Hugging Face folder ('none' to skip texts).")
@click.option("--image-weights", type=click.Path(path_type=Path), help="Local image weights file.")
@click.option("--text-weights", type=click.Path(path_type=Path), help="Local Hugging Face folder of the text backbone.")
@click.option("--image-size", default=224, show_default=True, help="Center-crop size (resize keeps the 256/224 ratio).")
@click.option("--batch-size", default=64, show_default=True, help="Images per forward pass.")
@click.option("--text-batch-size", default=256, show_default=True, help="Titles per forward pass.")
@click.option("--workers", default=2, show_default=True, help="DataLoader processes decoding images.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present, else CPU).")
@click.option("--add", is_flag=True, help="Store these backbones' features beside other backbones' already in STORE.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@one_line_errors
def extract(manifest, store, image_backbone, text_backbone, image_weights, text_weights, image_size, batch_size,
            text_batch_size, workers, device, add, progress):
    """Write every MANIFEST item's pooled image and text features into STORE; resumes where it stopped."""
    from embedstore.extract import ExtractSettings, extract as run_extract

    settings = ExtractSettings(
        image_backbone=optional_name(image_backbone), text_backbone=optional_name(text_backbone),
        image_weights=str(image_weights) if image_weights else None,
        text_weights=str(text_weights) if text_weights else None,
        image_size=image_size, batch_size=batch_size, text_batch_size=text_batch_size, workers=workers,
        device=device, add=add, progress=progress,
    )
    for report in run_extract(manifest, store, settings):
        skipped = ", ".join(f"{k} {v}" for k, v in report.counts.items() if k.startswith("skipped")) or "none skipped"
        state = "complete" if report.complete else "INCOMPLETE"
        click.echo(f"{report.name}: computed {report.computed} rows in {report.seconds:.1f} s; "
                   f"ok {report.counts.get('ok', 0)}, {skipped}; {state}")


@embed.command()
@click.argument("store", type=click.Path(path_type=Path))
@one_line_errors
def inspect(store):
    """Print what STORE holds: items per split, classes, feature sets with provenance, skipped items."""
    from embedstore.inspect import describe_store

    for line in describe_store(store):
        click.echo(line)


main = embed

if __name__ == "__main__":
    main()
