"""`embed paper`: the paper's whole comparison on one catalog, in one command (pipelines/paper.py)."""
from __future__ import annotations

from pathlib import Path

import click

from cli.common import (BF16_MEASURED, DEVICE_DEFAULT, NON_NEGATIVE, POSITIVE, comma_list, int_list, one_line_errors,
                        setting_option, split_count_options, split_counts)


@click.command()
@click.argument("catalog", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Folder for every step's output and OUT/report/; rerun to resume (finished steps are skipped).")
@setting_option("--image-backbone", setting="pipelines.paper_settings:PaperSettings.image_backbone", help="The paper's: resnet50.")
@setting_option("--text-backbone", setting="pipelines.paper_settings:PaperSettings.text_backbone", help="The paper's: bert-base-uncased.")
@click.option("--image-weights", type=click.Path(path_type=Path), help="Local image weights file.")
@click.option("--text-weights", type=click.Path(path_type=Path), help="Local Hugging Face folder of the text backbone.")
@setting_option("--image-size", setting="pipelines.paper_settings:PaperSettings.image_size", type=POSITIVE, help="Image size: the center crop (--image-resize crop) or the padded square (pad).")
@setting_option("--seeds", setting="pipelines.paper_settings:PaperSettings.seeds", help="Seeds of the heads and of the S1/S2 modules.")
@setting_option("--manifest-seeds", setting="pipelines.paper_settings:PaperSettings.manifest_seeds",
                help="Seeds of the tuning draws (at least two): every model is chosen on the first one's validation "
                     "split and scored on each.")
@click.option("--check-manifest-seeds", default=None, show_default="none",
              help="Comma-separated seeds of check draws: every step runs on them too, but nothing is chosen on them; "
                   "the report scores the choices there (issue #20's margin target covers them).")
@setting_option("--image-resize", type=click.Choice(["crop", "pad"]), setting="pipelines.paper_settings:PaperSettings.image_resize",
                help="crop = the protocol's resize and center crop; pad = the whole photo on a white square: the "
                     "store's image features and every image module (S1-S3) use it.")
@click.option("--cross-fit", "cross_fit", type=int, default=None, metavar="K",
              help="Also train the fused pair's modules cross-fitted (`embed finetune --cross-fit K`, K >= 2) and "
                   "sweep 1-A, 1-B, LFM over their out-of-fold features beside the plain ones; the report names "
                   "those rows (cross-fit).")
@setting_option("--min-items", setting="embedstore.manifest:SplitSettings.min_items", type=POSITIVE, help="Keep classes with at least this many usable items.")
@setting_option("--items-per-class", setting="embedstore.manifest:SplitSettings.items_per_class", type=POSITIVE,
              help="Items drawn from each kept class, split 7:1:2 as `embed prepare` does unless --train/--val/--test "
                   "say otherwise.")
@split_count_options
@click.option("--fusions", default=None, show_default="every registered operator",
              help="Comma-separated fusion operators.")
@setting_option("--pair", setting="pipelines.paper_settings:PaperSettings.pair",
              help="Image and text module strategies whose features 1-A/1-B fuse (the paper's best: 2,3).")
@setting_option("--text-s3-epochs", setting="pipelines.paper_settings:PaperSettings.text_s3_epochs", type=POSITIVE, help="Most epochs of text S3 (the slow step).")
@setting_option("--text-s3-seeds", setting="pipelines.paper_settings:PaperSettings.text_s3_seeds", help="Comma-separated seeds of the text S3 fine-tunings.")
@click.option("--image-s3/--no-image-s3", default=None, show_default="on with CUDA, off on a CPU",
              help="Fine-tune the image backbone (S3); on a CPU ~6-8 min per epoch, tens of epochs.")
@setting_option("--image-s3-epochs", setting="pipelines.paper_settings:PaperSettings.image_s3_epochs", type=POSITIVE, help="Most epochs of image S3.")
@setting_option("--image-s3-seeds", setting="pipelines.paper_settings:PaperSettings.image_s3_seeds", help="Comma-separated seeds of the image S3 fine-tunings.")
@setting_option("--end-to-end/--no-end-to-end", setting="pipelines.paper_settings:PaperSettings.end_to_end",
              help="Also train strategies 3-A/3-B end to end on the raw catalog (slow).")
@setting_option("--end-to-end-fusions", setting="pipelines.paper_settings:PaperSettings.end_to_end_fusions", help="Comma-separated fusion operators of 3-A/3-B.")
@setting_option("--end-to-end-epochs", setting="pipelines.paper_settings:PaperSettings.end_to_end_epochs", type=POSITIVE, help="Most epochs of a 3-A/3-B model.")
@setting_option("--head-epochs", setting="pipelines.paper_settings:PaperSettings.head_epochs", type=POSITIVE, help="Most epochs of a fusion head.")
@click.option("--module-epochs", type=POSITIVE, default=None, show_default="100", help="Most epochs of S1/S2 modules.")
@click.option("--device", default=None, show_default=DEVICE_DEFAULT, help="cpu, cuda or cuda:N.")
@setting_option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), setting="pipelines.paper_settings:PaperSettings.precision",
              help=f"The heads' precision (auto: bf16 autocast on CUDA, float32 on CPU). {BF16_MEASURED}.")
@setting_option("--workers", setting="pipelines.paper_settings:PaperSettings.workers", type=NON_NEGATIVE, help="DataLoader processes decoding images.")
@setting_option("--progress/--no-progress", setting="pipelines.paper_settings:PaperSettings.progress", help="Progress bars on stderr.")
@one_line_errors
def paper(catalog, out, image_backbone, text_backbone, image_weights, text_weights, image_size, seeds,
          manifest_seeds, min_items, items_per_class, train, val, test, fusions, pair, text_s3_epochs, text_s3_seeds,
          image_s3, image_s3_epochs, image_s3_seeds, end_to_end, end_to_end_fusions, end_to_end_epochs, head_epochs,
          module_epochs, device, precision, workers, progress, check_manifest_seeds, image_resize, cross_fit):
    """Run the 14-strategy comparison of Seo, Lee & Jang (2025) on CATALOG: manifests, features, modules,
    heads sweeps and one report (OUT/report/report.md)."""
    from embedstore.manifest import SplitSettings
    from pipelines.paper import PaperSettings, run_paper

    pair_strategies = int_list(pair, "--pair")
    if len(pair_strategies) != 2:
        raise ValueError(f"--pair takes two strategies (image,text), e.g. 2,3; got {pair!r}")
    settings = PaperSettings(
        image_backbone=image_backbone, text_backbone=text_backbone,
        image_weights=str(image_weights) if image_weights else None,
        text_weights=str(text_weights) if text_weights else None, image_size=image_size,
        seeds=int_list(seeds, "--seeds"), manifest_seeds=int_list(manifest_seeds, "--manifest-seeds"),
        split=SplitSettings(min_items=min_items, items_per_class=items_per_class,
                            **dict(zip(("train", "val", "test"), split_counts(items_per_class, train, val, test)))),
        fusions=tuple(comma_list(fusions)) if fusions else None, pair=pair_strategies, text_s3_epochs=text_s3_epochs,
        text_s3_seeds=int_list(text_s3_seeds, "--text-s3-seeds"), image_s3=image_s3, image_s3_epochs=image_s3_epochs,
        image_s3_seeds=int_list(image_s3_seeds, "--image-s3-seeds"), end_to_end=end_to_end,
        end_to_end_fusions=tuple(comma_list(end_to_end_fusions)), end_to_end_epochs=end_to_end_epochs,
        head_epochs=head_epochs, module_epochs=module_epochs, device=device, precision=precision, workers=workers,
        progress=progress, image_resize=image_resize, cross_fit=cross_fit,
        check_manifest_seeds=int_list(check_manifest_seeds, "--check-manifest-seeds"))
    report = run_paper(catalog, out, settings, log=click.echo)
    click.echo(f"report: {report}")
