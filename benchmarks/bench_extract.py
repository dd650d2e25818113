"""Extraction against the bare backbone forward pass, the store's read throughput, and peak memory.

    python benchmarks/bench_extract.py --catalog ../shared/datasets/fashion-product-images-small.zip \
        --out runs/bench-extract [--image-backbone efficientnet_lite0] [--text-backbone all-MiniLM-L6-v2]

    python benchmarks/bench_extract.py --catalog CATALOG --device cuda --pipelines pil,tensor --workers 12 \
        --batch-size 256 --memory-sizes none          # the GPU check (benchmarks/gpu_check.sh)

One run on one machine, printed as ratios (these machines are noisy):
1. bare forward: the image backbone on normalized batches already on the device, channels-last, in the precision
   extraction uses there (bf16 autocast on CUDA, float32 on a CPU), images/s;
2. `extract` of the protocol manifest (9,250 items) with DataLoader workers, images/s and titles/s, once per
   image pipeline asked for ("pil": workers transform; "tensor": workers decode, the device resizes, crops and
   normalizes); the ratio of 2 to 1 says whether decode, transform and write hide behind compute (target >= 0.9
   on a CPU, >= 0.7 on a GPU: issue 13);
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.backbones import create_backbone  # noqa: E402
from embedstore.catalog import open_catalog  # noqa: E402
from embedstore.defaults import autocast_for, resolve_device  # noqa: E402
from embedstore.extract import extract  # noqa: E402
from embedstore.extract_plan import ExtractSettings  # noqa: E402
from embedstore.manifest import SplitSettings, prepare_manifest  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402


def bare_forward_rate(name: str, batch_size: int, batches: int, image_size: int, device: torch.device) -> float:
    """Images/s of the forward pass alone on a fixed batch already on the device (no decoding, no writing)."""
    # the same memory format and precision as `extract` uses, so the ratio compares like with like
    backbone = create_backbone("image", name, image_size=image_size)
    backbone = backbone.to(device, memory_format=torch.channels_last).eval()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    images = images.to(memory_format=torch.channels_last)  # (B, 3, H, W)
    with torch.inference_mode(), autocast_for(device):
        for _ in range(2):  # warm-up (cuDNN picks its algorithms on the first calls)
            backbone(images)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            backbone(images)
        _synchronize(device)
    return batch_size * batches / (time.perf_counter() - start)


def pipeline_agreement(first: Path, second: Path) -> dict:
    """How far two stores' image features (two pipelines, same items) differ, and whether a logistic regression
    trained on the first's training features predicts the same test classes from either."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with FeatureStore(first) as a, FeatureStore(second) as b:
        (name,) = [n for n in a.feature_sets if n.startswith("image/")]
        da, db = a.load([name]), b.load([name])
    if list(da.ids) != list(db.ids):
        raise ValueError(f"{first} and {second} hold other items; extract both from one manifest")
    x, y = da.features[name], db.features[name]          # (n, D) each
    rel = np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    train, test = da.split == "train", da.split == "test"
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000)).fit(x[train], da.labels[train])
    pa, pb = model.predict(x[test]), model.predict(y[test])
    result = {"rows": len(x), "relative_l2_median": float(np.median(rel)), "relative_l2_max": float(rel.max()),
              "cosine_min": float(cos.min()), "test_items": int(test.sum()), "same_prediction": float(np.mean(pa == pb)),
              "accuracy": [float(np.mean(pa == da.labels[test])), float(np.mean(pb == da.labels[test]))]}
    print(f"agreement     {first.stem} vs {second.stem}, {len(x)} rows: relative L2 median {result['relative_l2_median']:.4f}"
          f", max {result['relative_l2_max']:.4f}; cosine min {result['cosine_min']:.5f}")
    print(f"agreement     a regression trained on {first.stem}'s features: same test class for "
          f"{result['same_prediction']:.4f} of {result['test_items']} items; accuracy {result['accuracy'][0]:.4f} "
          f"({first.stem}) vs {result['accuracy'][1]:.4f} ({second.stem})")
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    parser.add_argument("--text-backbone", default="all-MiniLM-L6-v2", help="'none': images only")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bare-batches", type=int, default=8)
    parser.add_argument("--memory-sizes", default="20,80",
                        help="items per class of the two memory manifests ('none': skip the memory part)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when present)")
    parser.add_argument("--pipelines", default="pil", help="image pipelines to extract with, comma-separated: pil,tensor")
    parser.add_argument("--repeats", type=int, default=1, help="extractions per pipeline, alternated A B B A ...")
    parser.add_argument("--items-per-class", type=int, default=250,
                        help="items drawn from each of the protocol's 37 classes (split 70/10/20; 250: the protocol)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch threads {torch.get_num_threads()}, workers {args.workers}, batch {args.batch_size}, "
          f"image size {args.image_size}")

    catalog = open_catalog(args.catalog)
    manifest_path = out / "manifest.json"
    n = args.items_per_class
    manifest = prepare_manifest(catalog, SplitSettings() if n == 250 else SplitSettings(
        min_items=250, items_per_class=n, train=round(0.7 * n), val=round(0.1 * n), test=n - round(0.7 * n) - round(0.1 * n)))
    manifest.save(manifest_path)

    pipelines = args.pipelines.split(",")
    # A B B A ...: a change in the machine's load hits every pipeline alike; each run is timed against the mean
    # of bare forward passes measured just before and just after it
    order = [p for r in range(args.repeats) for p in (pipelines if r % 2 == 0 else pipelines[::-1])]
    results = {"device": str(device), "runs": [], "pipelines": {}}
    for i, pipeline in enumerate(order):
        bare = bare_forward_rate(args.image_backbone, args.batch_size, args.bare_batches, args.image_size, device)
        store_path = out / f"store-{pipeline}.h5"
        store_path.unlink(missing_ok=True)
        # titles once: they do not depend on the image pipeline
        settings = ExtractSettings(image_backbone=args.image_backbone,
                                   text_backbone=args.text_backbone if i == 0 and args.text_backbone != "none" else None,
                                   image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
                                   device=str(device), image_pipeline=pipeline, progress=False)
        wall = time.perf_counter()
        reports = extract(manifest_path, store_path, settings)
        wall = time.perf_counter() - wall
        after = bare_forward_rate(args.image_backbone, args.batch_size, args.bare_batches, args.image_size, device)
        print(f"bare forward  {args.image_backbone}: {bare:.1f} images/s before, {after:.1f} after")
        bare = (bare + after) / 2
        image_report = reports[0]
        image_rate = image_report.computed / image_report.seconds
        print(f"extract       {image_report.name} ({pipeline} pipeline): {image_report.computed} images in "
              f"{image_report.seconds:.1f} s = {image_rate:.1f} images/s ({image_rate / bare:.2f} of the bare "
              f"forward); {image_report.counts}")
        results["runs"].append({"pipeline": pipeline, "bare_images_per_s": bare, "images": image_report.computed,
                                "image_s": image_report.seconds})
        if len(reports) > 1:
            text_report = reports[1]
            print(f"extract       {text_report.name}: {text_report.computed} titles in {text_report.seconds:.1f} s "
                  f"= {text_report.computed / text_report.seconds:.1f} titles/s")
            print(f"extract       protocol ({len(manifest.items)} items, {pipeline}) wall time {wall:.1f} s")
            results.update(protocol_wall_s=wall, text_s=text_report.seconds)
    for pipeline in pipelines:
        runs = [r for r in results["runs"] if r["pipeline"] == pipeline]
        rate = sum(r["images"] for r in runs) / sum(r["image_s"] for r in runs)
        ratios = [r["images"] / r["image_s"] / r["bare_images_per_s"] for r in runs]  # each run vs its own bare
        results["pipelines"][pipeline] = {"extract_images_per_s": rate, "ratios": ratios,
                                          "ratio": sum(ratios) / len(ratios)}
        print(f"ratio         extraction ({pipeline}) / bare forward: {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(mean {sum(ratios) / len(ratios):.2f}; target >= 0.9 on a CPU, >= 0.7 on a GPU)")
    if len(pipelines) > 1:
        rates = [results["pipelines"][p]["extract_images_per_s"] for p in pipelines]
        print(f"ratio         {pipelines[1]} / {pipelines[0]} pipeline, images/s over all runs = {rates[1] / rates[0]:.2f}")
        results["agreement"] = pipeline_agreement(out / f"store-{pipelines[0]}.h5", out / f"store-{pipelines[1]}.h5")

    with FeatureStore(out / f"store-{args.pipelines.split(',')[0]}.h5") as store:
        names = list(store.feature_sets)
        start = time.perf_counter()
        data = store.load(names)
        seconds = time.perf_counter() - start
    megabytes = sum(matrix.nbytes for matrix in data.features.values()) / 2**20
    print(f"read          {len(data.ids)} rows x {len(names)} sets ({megabytes:.1f} MiB) in {seconds:.3f} s "
          f"= {len(data.ids) / seconds:,.0f} rows/s, {megabytes / seconds:,.0f} MiB/s")
    results["read_rows_per_s"] = len(data.ids) / seconds

    peaks = {}
    sizes = [] if args.memory_sizes == "none" else [int(n) for n in args.memory_sizes.split(",")]
    for per_class in sizes:
        train, val = int(per_class * 0.7), int(per_class * 0.1)
        small = prepare_manifest(catalog, SplitSettings(items_per_class=per_class, train=train, val=val,
                                                        test=per_class - train - val))
        path = out / f"manifest-{per_class}.json"
        small.save(path)
        memory_store = out / f"store-{per_class}.h5"
        memory_store.unlink(missing_ok=True)
        peaks[len(small.items)] = peak_memory_mib(path, memory_store, args)
        print(f"peak memory   {len(small.items):>5} items: {peaks[len(small.items)]:.0f} MiB")
    if peaks:
        sizes = sorted(peaks)
        print(f"memory ratio  {sizes[-1]} / {sizes[0]} items: {peaks[sizes[-1]] / peaks[sizes[0]]:.2f} "
              f"(catalog {sizes[-1] / sizes[0]:.1f}x larger)")
    results["peak_memory_mib"] = peaks
    (out / "result.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
