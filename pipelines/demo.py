"""The built-in default job: the whole pipeline end to end on a small generated catalog, in a few minutes.

generate catalog (zip, with the real catalog's defects) -> prepare -> extract with the offline pretrained
backbones -> heads sweep (strategies 2-A, 2-B x five operators x seeds, plus unimodal baselines) -> report.
Each step's output lands in OUT; re-running skips what is already there (extraction resumes, the sweep skips
runs in runs.jsonl).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEMO_CLASSES = ("Tshirts", "Watches", "Casual Shoes", "Handbags", "Sunglasses", "Jeans")


@dataclass
class DemoSettings:
    per_class: int = 60  # generated items per class; 50 are drawn (35 / 5 / 10)
    image_backbone: str = "efficientnet_lite0"
    text_backbone: str = "all-MiniLM-L6-v2"
    image_size: int = 224
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str | None = None


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), log: Callable[[str], None] = print) -> Path:
    """Run the pipeline into OUT and return the report's Markdown file."""
    from embedstore.catalog import open_catalog
    from embedstore.extract import ExtractSettings, extract
    from embedstore.inspect import format_counts
    from embedstore.manifest import SplitSettings, format_summary, prepare_manifest
    from embedstore.synthetic_catalog import make_fashion_catalog
    from heads.report import write_report
    from heads.sweep import SweepSettings, run_sweep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    catalog_path = out / "catalog" / "fashion-product-images-small.zip"
    if not catalog_path.exists():
        catalog_path = make_fashion_catalog(out / "catalog", classes=DEMO_CLASSES, per_class=settings.per_class,
                                            as_zip=True).path
    log(f"1/4 catalog  {catalog_path}")

    manifest_path = out / "manifest.json"
    manifest = prepare_manifest(open_catalog(catalog_path),
                                SplitSettings(min_items=50, items_per_class=50, train=35, val=5, test=10, seed=0))
    manifest.save(manifest_path)
    log("2/4 prepare  " + format_summary(manifest).replace("\n", "\n             "))

    store_path = out / "store.h5"
    extract_settings = ExtractSettings(image_backbone=settings.image_backbone, text_backbone=settings.text_backbone,
                                       image_size=settings.image_size, device=settings.device)
    for report in extract(manifest_path, store_path, extract_settings):
        log(f"3/4 extract  {report.name}: {report.computed} rows in {report.seconds:.1f} s, "
            f"{format_counts(report.counts)}")

    results = out / "results"
    summary = run_sweep(store_path, results,
                        SweepSettings(strategies=("2A", "2B"), seeds=tuple(settings.seeds), device=settings.device),
                        log=lambda line: None)
    log(f"4/4 sweep    {summary['trained']} heads trained, {summary['skipped']} already done, "
        f"{summary['seconds']:.1f} s")
    paths = write_report(results, out / "report")
    report_md = next(path for path in paths if path.suffix == ".md")
    log(f"report       {report_md}")
    return report_md
