"""Extraction against the bare backbone forward pass, the store's read throughput, and peak memory.

    python benchmarks/bench_extract.py --catalog ../shared/datasets/fashion-product-images-small.zip \
        --out runs/bench-extract [--image-backbone efficientnet_lite0] [--text-backbone all-MiniLM-L6-v2]

One run on one machine, printed as ratios (these machines are noisy):
1. bare forward: the image backbone on preprocessed batches already in memory, images/s;
2. `extract` of the protocol manifest (9,250 items) with DataLoader workers, images/s and titles/s; the ratio
   of 2 to 1 says whether decode, transform and write hide behind compute (target >= 0.9);
3. the store's read throughput (FeatureStore.load of both pooled sets);
4. peak resident memory of `embed extract` (a child process) on two manifests of different sizes: it must
   not grow with the catalog.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.backbones import create_backbone  # noqa: E402
from embedstore.catalog import open_catalog  # noqa: E402
from embedstore.extract import ExtractSettings, extract  # noqa: E402
from embedstore.manifest import Manifest, SplitSettings, prepare_manifest  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402


def bare_forward_rate(name: str, batch_size: int, batches: int, image_size: int) -> float:
    """Images/s of the forward pass alone on a fixed batch (no decoding, no writing)."""
    # the same memory format as `extract` uses, so the ratio compares like with like
    backbone = create_backbone("image", name, image_size=image_size).to(memory_format=torch.channels_last).eval()
    images = torch.randn(batch_size, 3, image_size, image_size).to(memory_format=torch.channels_last)  # (B, 3, H, W)
    with torch.inference_mode():
        backbone(images)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            backbone(images)
    return batch_size * batches / (time.perf_counter() - start)


def peak_memory_mib(manifest: Path, store: Path, args) -> float:
    """Peak RSS of an `embed extract` child process (workers included via RUSAGE_CHILDREN of a wrapper)."""
    code = (
        "import resource, subprocess, sys; "
        f"subprocess.run({[sys.executable, '-m', 'cli.embed', 'extract', str(manifest), '--store', str(store), '--image-backbone', args.image_backbone, '--text-backbone', 'none', '--batch-size', str(args.batch_size), '--workers', str(args.workers), '--image-size', str(args.image_size), '--no-progress']!r}, check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    return int(out.strip().splitlines()[-1]) / 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--out", default="runs/bench-extract")
    parser.add_argument("--image-backbone", default="efficientnet_lite0")
    parser.add_argument("--text-backbone", default="all-MiniLM-L6-v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bare-batches", type=int, default=8)
    parser.add_argument("--memory-sizes", default="20,80", help="items per class of the two memory manifests")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"torch threads {torch.get_num_threads()}, workers {args.workers}, batch {args.batch_size}, "
          f"image size {args.image_size}")

    catalog = open_catalog(args.catalog)
    manifest_path = out / "manifest.json"
    manifest = prepare_manifest(catalog, SplitSettings())
    manifest.save(manifest_path)

    bare = bare_forward_rate(args.image_backbone, args.batch_size, args.bare_batches, args.image_size)
    print(f"bare forward  {args.image_backbone}: {bare:.1f} images/s")

    store_path = out / "store.h5"
    store_path.unlink(missing_ok=True)
    settings = ExtractSettings(image_backbone=args.image_backbone, text_backbone=args.text_backbone,
                               image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
                               progress=False)
    wall = time.perf_counter()
    reports = extract(manifest_path, store_path, settings)
    wall = time.perf_counter() - wall
    image_report, text_report = reports
    image_rate = image_report.computed / image_report.seconds
    print(f"extract       {image_report.name}: {image_report.computed} images in {image_report.seconds:.1f} s "
          f"= {image_rate:.1f} images/s; skipped {image_report.counts}")
    print(f"extract       {text_report.name}: {text_report.computed} titles in {text_report.seconds:.1f} s "
          f"= {text_report.computed / text_report.seconds:.1f} titles/s")
    print(f"extract       protocol ({len(manifest.items)} items) wall time {wall:.1f} s")
    print(f"ratio         extraction / bare forward = {image_rate / bare:.2f} (target >= 0.9)")

    with FeatureStore(store_path) as store:
        names = list(store.feature_sets)
        start = time.perf_counter()
        data = store.load(names)
        seconds = time.perf_counter() - start
    megabytes = sum(matrix.nbytes for matrix in data.features.values()) / 2**20
    print(f"read          {len(data.ids)} rows x {len(names)} sets ({megabytes:.1f} MiB) in {seconds:.3f} s "
          f"= {len(data.ids) / seconds:,.0f} rows/s, {megabytes / seconds:,.0f} MiB/s")

    peaks = {}
    for per_class in (int(n) for n in args.memory_sizes.split(",")):
        train, val = int(per_class * 0.7), int(per_class * 0.1)
        small = prepare_manifest(catalog, SplitSettings(items_per_class=per_class, train=train, val=val,
                                                        test=per_class - train - val))
        path = out / f"manifest-{per_class}.json"
        small.save(path)
        memory_store = out / f"store-{per_class}.h5"
        memory_store.unlink(missing_ok=True)
        peaks[len(small.items)] = peak_memory_mib(path, memory_store, args)
        print(f"peak memory   {len(small.items):>5} items: {peaks[len(small.items)]:.0f} MiB")
    sizes = sorted(peaks)
    print(f"memory ratio  {sizes[-1]} / {sizes[0]} items: {peaks[sizes[-1]] / peaks[sizes[0]]:.2f} "
          f"(catalog {sizes[-1] / sizes[0]:.1f}x larger)")
    (out / "result.json").write_text(json.dumps({
        "bare_images_per_s": bare, "extract_images_per_s": image_rate, "ratio": image_rate / bare,
        "protocol_wall_s": wall, "image_s": image_report.seconds, "text_s": text_report.seconds,
        "read_rows_per_s": len(data.ids) / seconds, "peak_memory_mib": peaks,
    }, indent=1))


if __name__ == "__main__":
    main()
