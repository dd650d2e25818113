"""The built-in default job: the whole pipeline end to end on a small generated catalog, in a few minutes.

generate catalog (zip, with the real catalog's defects) -> prepare -> extract with the offline pretrained
backbones -> heads sweep (strategies 2-A, 2-B x five operators x seeds, plus unimodal baselines) -> report.
Each step's output lands in OUT; re-running skips what is already there (extraction resumes, the sweep skips
runs in runs.jsonl).

The catalog is made for fusion to show (embedstore/synthetic_catalog.py, contents "fusion"): its classes come
in pairs that share their titles' words, and an image's colour tells the class within a pair. So text alone
confuses the classes of a pair, image alone confuses the pairs, and the report's Table 7 reads image-only <
text-only < fused (about 32-37 / 62-73 / 92-94 % with the default backbones at 112 px; each seed held that order
in every catalog draw tried: catalog seeds 0-3, head seeds 0-2).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from embedstore.defaults import DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE

# in pairs (0-1, 2-3, 4-5) that share their titles' vocabulary: clothing, accessories, leather goods
DEMO_CLASSES = ("Tshirts", "Jeans", "Watches", "Sunglasses", "Casual Shoes", "Handbags")
CATALOG_NAME = "generated-catalog"   # never the real catalog's file name: nobody should take it for real data


@dataclass
class DemoSettings:
    # generated items per class, all drawn but 1-2 (50 / 10 / 20: 120 test items, so that the demo's accuracies
    # are not within a few items of each other), so the corrupt JPEG is drawn and extraction shows its skip
    per_class: int = 80
    image_backbone: str = DEFAULT_IMAGE_BACKBONE
    text_backbone: str = DEFAULT_TEXT_BACKBONE
    # the generated photos are 60x80 px, like the real catalog's: 112 px loses nothing of them and costs a quarter
    # of 224's convolutions (the whole demo: 25-31 s against 46 s on 2 idle cores, measured 2026-12-07)
    image_size: int = 112
    seeds: tuple[int, ...] = (0, 1, 2)
    catalog_seed: int = 0  # the generated catalog's draw (when OUT holds no catalog yet)
    device: str | None = None


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), log: Callable[[str], None] = print) -> Path:
    """Run the pipeline into OUT and return the report's Markdown file."""
    from embedstore.catalog import open_catalog
    from embedstore.extract import extract
    from embedstore.extract_plan import ExtractSettings
    from embedstore.inspect import format_counts
    from embedstore.manifest import SplitSettings, format_summary, prepare_manifest
    from embedstore.synthetic_catalog import make_fashion_catalog
    from heads.report import write_report
    from heads.strategies import strategies_reading
    from heads.sweep import SweepSettings, run_sweep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    catalog_path = out / "catalog" / f"{CATALOG_NAME}.zip"
    if not catalog_path.exists():
        catalog_path = make_fashion_catalog(out / "catalog", classes=DEMO_CLASSES, per_class=settings.per_class,
                                            as_zip=True, contents="fusion", name=CATALOG_NAME,
                                            seed=settings.catalog_seed).path
    log(f"1/4 catalog  {catalog_path}")

    manifest_path = out / "manifest.json"
    manifest = prepare_manifest(open_catalog(catalog_path),
                                SplitSettings(min_items=80, items_per_class=80, train=50, val=10, test=20, seed=0))
    manifest.save(manifest_path)
    log("2/4 prepare  " + format_summary(manifest).replace("\n", "\n             "))

    store_path = out / "store.h5"
    extract_settings = ExtractSettings(image_backbone=settings.image_backbone, text_backbone=settings.text_backbone,
                                       image_size=settings.image_size, device=settings.device)
    for report in extract(manifest_path, store_path, extract_settings):
        log(f"3/4 extract  {report.name}: {report.computed} rows in {report.seconds:.1f} s, "
            f"{format_counts(report.counts)}")

    results = out / "results"
    # the fused heads over the backbones' pooled features (2-A, 2-B): the store holds nothing else
    fused_over_pooled = strategies_reading("pooled", trainer="head", fused=True)
    summary = run_sweep(store_path, results,
                        SweepSettings(strategies=fused_over_pooled, seeds=tuple(settings.seeds), device=settings.device),
                        log=lambda line: None)
    log(f"4/4 sweep    {summary['trained']} heads trained, {summary['skipped']} already done, "
        f"{summary['seconds']:.1f} s")
    paths = write_report(results, out / "report")
    report_md = next(path for path in paths if path.suffix == ".md")
    log(f"report       {report_md}")
    log("look at      Table 7 (and accuracy.png): the classes come in pairs; a title tells the pair but rarely "
        "which class of it,\n             an image's colour which class of its pair but hardly the pair: "
        "image-only < text-only < fused.")
    return report_md
