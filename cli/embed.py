"""`embed`: catalogs, manifests and the feature store. Commands parse options and call one library function."""
from __future__ import annotations

from pathlib import Path

import click

from cli.common import (DEVICE_DEFAULT, GROUP_SETTINGS, NON_NEGATIVE, POSITIVE, one_line_errors, optional_name,
                        package_version, setting_option, split_count_options, split_counts)


@click.group(context_settings=GROUP_SETTINGS)
@click.version_option(package_version(), "--version", prog_name="embed")
def embed():
    """Run image and text backbones once and keep their features in an HDF5 feature store."""


@embed.command()
@click.argument("catalog", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Manifest file to write (JSON).")
@click.option("--min-items", type=POSITIVE, default=None, show_default="250; with --fractions 20",
              help="Keep classes with at least this many usable items.")
@setting_option("--items-per-class", setting="embedstore.manifest:SplitSettings.items_per_class", type=POSITIVE,
              help="Items drawn from each kept class, split 7:1:2 into train/val/test like the paper's 175/25/50 "
                   "(rounded as --fractions rounds: 40 -> 28/4/8, 10 -> 7/1/2, 5 -> 3/1/1) unless --train/--val/"
                   "--test say otherwise.")
@split_count_options
@click.option("--fractions", default=None, metavar="TRAIN,VAL,TEST",
              help="Keep every usable item of each kept class and split each class by these fractions, e.g. "
                   "0.7,0.1,0.2 (instead of the fixed counts above).")
@click.option("--max-per-class", type=POSITIVE, default=None, show_default="no cap",
              help="With --fractions: at most this many items of a class (a seeded draw; the rest 'not sampled').")
@setting_option("--seed", setting="embedstore.manifest:SplitSettings.seed", type=NON_NEGATIVE, help="Seed of the draw and the split.")
@setting_option("--format", "fmt", type=click.Choice(["auto", "fashion", "csv"]), setting="embedstore.catalog:open_catalog.fmt",
              help="fashion = styles.csv + images/ (folder or zip); csv = a generic catalog with named columns.")
@setting_option("--id-column", setting="embedstore.catalog_csv:CsvColumns.id", help="Generic CSV: the id column.")
@setting_option("--image-column", setting="embedstore.catalog_csv:CsvColumns.image", help="Generic CSV: image path column.")
@setting_option("--title-column", setting="embedstore.catalog_csv:CsvColumns.title", help="Generic CSV: title column.")
@setting_option("--label-column", setting="embedstore.catalog_csv:CsvColumns.label", help="Generic CSV: label column.")
@one_line_errors
def prepare(catalog, out, min_items, items_per_class, train, val, test, fractions, max_per_class, seed, fmt,
            id_column, image_column, title_column, label_column):
    """Under-sample and split CATALOG (folder, zip or CSV) into a manifest, saying what was dropped and why.

    Default: the paper's fixed counts per class (175/25/50 of 250; --items-per-class N alone scales them 7:1:2).
    With --fractions: every usable item, split per class.
    """
    from embedstore.catalog import open_catalog
    from embedstore.catalog_csv import CsvColumns
    from embedstore.outputs import check_writable
    from embedstore.manifest import FractionSettings, SplitSettings, format_summary, prepare_manifest

    check_writable(out, folder=False)  # before reading the catalog
    context = click.get_current_context()
    if fractions is not None:
        fixed = [f"--{name.replace('_', '-')}" for name in ("items_per_class", "train", "val", "test")
                 if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} set fixed counts per class; --fractions splits every item by "
                             "fractions instead: give one or the other")
        settings = FractionSettings(fractions=tuple(_fractions(fractions)), seed=seed, max_per_class=max_per_class,
                                    min_items=20 if min_items is None else min_items)
    else:
        if max_per_class is not None:
            raise ValueError("--max-per-class caps a class under --fractions; with fixed counts use "
                             "--items-per-class")
        train, val, test = split_counts(items_per_class, train, val, test)
        settings = SplitSettings(min_items=250 if min_items is None else min_items,
                                 items_per_class=items_per_class, train=train, val=val, test=test, seed=seed)
    columns = CsvColumns(id=id_column, image=image_column, title=title_column, label=label_column)
    opened = open_catalog(catalog, fmt=fmt, columns=columns)
    manifest = prepare_manifest(opened, settings)
    manifest.save(out)
    click.echo(format_summary(manifest))
    click.echo(f"wrote {out} (sha256 {manifest.sha256[:16]})")


def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--fractions takes three comma-separated numbers (train,val,test), got {text!r}; "
                         "e.g. 0.7,0.1,0.2") from None


@embed.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--store", required=True, type=click.Path(path_type=Path), help="HDF5 feature store to create or resume.")
@setting_option("--image-backbone", setting="embedstore.extract_plan:ExtractSettings.image_backbone",
              help="Image backbone name ('none' to skip images).")
@setting_option("--text-backbone", setting="embedstore.extract_plan:ExtractSettings.text_backbone",
              help="Text backbone name or local Hugging Face folder ('none' to skip texts).")
@click.option("--image-weights", type=click.Path(path_type=Path), show_default="the backbone's standard places",
              help="Local image weights file.")
@click.option("--text-weights", type=click.Path(path_type=Path), show_default="the backbone's standard places",
              help="Local Hugging Face folder of the text backbone.")
@setting_option("--image-size", setting="embedstore.extract_plan:ExtractSettings.image_size", type=POSITIVE, help="Center-crop size (resize keeps the 256/224 ratio).")
@setting_option("--batch-size", setting="embedstore.extract_plan:ExtractSettings.batch_size", type=POSITIVE, help="Images per forward pass.")
@setting_option("--text-batch-size", setting="embedstore.extract_plan:ExtractSettings.text_batch_size", type=POSITIVE, help="Titles per forward pass.")
@setting_option("--workers", setting="embedstore.extract_plan:ExtractSettings.workers", type=NON_NEGATIVE, help="DataLoader processes decoding images.")
@click.option("--device", default=None, show_default=DEVICE_DEFAULT, help="cpu, cuda or cuda:N.")
@click.option("--add", is_flag=True, help="Store these backbones' features beside other backbones' already in STORE.")
@setting_option("--progress/--no-progress", setting="embedstore.extract_plan:ExtractSettings.progress", help="Progress bars on stderr.")
@click.option("--image-module", type=click.Path(path_type=Path),
              help="Saved image module (`embed finetune`): store its dense and classifier outputs too.")
@click.option("--text-module", type=click.Path(path_type=Path),
              help="Saved text module (`embed finetune`): store its dense and classifier outputs too.")
@click.option("--shard", default=None, metavar="k/n|auto|none", show_default="auto under torchrun, else none",
              help="Extract only shard k (0-based) of n contiguous item ranges into STORE.shard-k-of-n.h5 "
                   "(join them with `embed merge`); auto = RANK/WORLD_SIZE of torchrun.")
@setting_option("--dtype", type=click.Choice(["float32", "float16"]), setting="embedstore.extract_plan:ExtractSettings.dtype",
              help="Stored feature values: float16 halves disk and memory (heads upcast each batch to float32).")
@setting_option("--image-pipeline", type=click.Choice(["auto", "pil", "tensor"]), setting="embedstore.extract_plan:ExtractSettings.image_pipeline",
              help="Where images are resized, cropped and normalized: pil = in the DataLoader workers; tensor = "
                   "workers only decode, the device does the rest batched; auto = tensor on CUDA, pil on a CPU.")
@setting_option("--image-resize", type=click.Choice(["crop", "pad"]), setting="embedstore.extract_plan:ExtractSettings.image_resize", show_default=True,
              help="crop = the protocol's resize and center crop; pad = the whole photo, aspect kept, centred on a "
                   "white square (its own feature set, source name ending in -pad).")
@one_line_errors
def extract(manifest, store, image_backbone, text_backbone, image_weights, text_weights, image_size, batch_size,
            text_batch_size, workers, device, add, progress, image_module, text_module, shard, dtype, image_pipeline,
            image_resize):
    """Write every MANIFEST item's pooled image and text features into STORE; resumes where it stopped.

    With --image-module / --text-module only the modules' features are written, unless backbones are named too.
    """
    from embedstore.extract import extract as run_extract
    from embedstore.extract_plan import ExtractSettings
    from embedstore.inspect import format_counts
    from embedstore.shards import parse_shard

    shard = parse_shard(shard)  # before any work: a bad --shard is a one-line error
    if image_module or text_module:
        # Module features are an addition to a store: backbones run only when asked for by name.
        context = click.get_current_context()
        if context.get_parameter_source("image_backbone") is click.core.ParameterSource.DEFAULT:
            image_backbone = "none"
        if context.get_parameter_source("text_backbone") is click.core.ParameterSource.DEFAULT:
            text_backbone = "none"
    settings = ExtractSettings(
        image_backbone=optional_name(image_backbone), text_backbone=optional_name(text_backbone),
        image_weights=str(image_weights) if image_weights else None,
        text_weights=str(text_weights) if text_weights else None,
        image_size=image_size, batch_size=batch_size, text_batch_size=text_batch_size, workers=workers,
        device=device, add=add, progress=progress,
        image_module=str(image_module) if image_module else None,
        text_module=str(text_module) if text_module else None, shard=shard, dtype=dtype,
        image_pipeline=image_pipeline, image_resize=image_resize,
    )
    if shard is not None:
        click.echo(f"shard {shard.index} of {shard.count} -> {shard.path_for(store)}")
    for report in run_extract(manifest, store, settings):
        if report.already_complete:
            click.echo(f"{report.name}: already complete ({format_counts(report.counts)}); nothing to compute")
            continue
        skipped = ", ".join(f"{k} {v}" for k, v in report.counts.items() if k.startswith("skipped")) or "none skipped"
        state = "complete" if report.complete else "INCOMPLETE"
        click.echo(f"{report.name}: computed {report.computed} rows in {report.seconds:.1f} s; "
                   f"ok {report.counts.get('ok', 0)}, {skipped}; {state}")


@embed.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Merged store to write.")
@one_line_errors
def merge(shards, out):
    """Join the SHARDS of one `embed extract --shard` run into one store, without copying features.

    Its feature datasets are HDF5 virtual datasets reading the shard files by relative name: keep the shard
    files beside the merged store (the folder may move as a whole).
    """
    from embedstore.outputs import check_writable
    from embedstore.shards import merge_shards
    from embedstore.store import FeatureStore

    check_writable(out, folder=False)
    merge_shards(shards, out)
    with FeatureStore(out) as store:
        click.echo(f"merged {len(shards)} shards into {out}: {len(store.ids)} items, "
                   f"{', '.join(sorted(store.feature_sets))}; it reads the shard files beside it")


@embed.command()
@click.argument("store", type=click.Path(path_type=Path))
@one_line_errors
def inspect(store):
    """Print what STORE holds: items per split, classes, feature sets with provenance, skipped items."""
    from embedstore.inspect import describe_store

    for line in describe_store(store):
        click.echo(line)


@embed.command()
@click.option("--out", "out", default="runs/demo", type=click.Path(path_type=Path),
              help="Folder for the generated catalog, manifest, store, results and report.")
@setting_option("--image-backbone", setting="pipelines.demo:DemoSettings.image_backbone", help="Image backbone name.")
@setting_option("--text-backbone", setting="pipelines.demo:DemoSettings.text_backbone", help="Text backbone name or local Hugging Face folder.")
@setting_option("--seeds", setting="pipelines.demo:DemoSettings.seeds", help="Comma-separated seeds of the heads.")
@click.option("--device", default=None, show_default=DEVICE_DEFAULT, help="cpu, cuda or cuda:N.")
@one_line_errors
def demo(out, image_backbone, text_backbone, seeds, device):
    """The built-in default job: generated catalog -> prepare -> extract -> heads sweep -> report."""
    from cli.common import int_list
    from pipelines.demo import DemoSettings, run_demo

    settings = DemoSettings(image_backbone=image_backbone, text_backbone=text_backbone, device=device,
                            seeds=int_list(seeds, "--seeds"))
    report = run_demo(out, settings, log=click.echo)
    click.echo(report.read_text())


from cli.finetune_cmd import finetune  # noqa: E402

embed.add_command(finetune)
from cli.paper_cmd import paper  # noqa: E402
embed.add_command(paper)

main = embed

if __name__ == "__main__":
    main()
