"""Test accuracy of heads over a float32 store against the same features stored as float16.

    python benchmarks/float16_accuracy.py --store runs/catalog/store.h5 --out runs/catalog/float16 \
        --strategies 2A,2B --fusions concat --seeds 0,1,2 --report benchmarks/results/catalog/float16.md

The float16 store is the float32 store's pooled features written again through the store writer with
dtype="float16" (the writer casts, exactly as `embed extract --dtype float16` does after the same forward pass;
tests/test_store_chunks.py checks that equality on a tiny extraction), so the backbones need not run twice.
Both stores are swept with the same settings; the report gives mean ± std over seeds per cell.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.store import STATUS_OK, FeatureStore  # noqa: E402
from embedstore.store_writer import FeatureSetWriter, create_store  # noqa: E402
from heads.results import read_runs  # noqa: E402
from heads.sweep import SweepSettings, run_sweep  # noqa: E402
from heads.train import TrainSettings  # noqa: E402

COPY_BLOCK = 8192


def float16_copy(source: Path, target: Path) -> Path:
    """The source store's pooled feature sets (values, status, provenance) as a float16 store."""
    with h5py.File(source, "r", locking=False) as raw:   # the manifest text as stored (attrs decode JSON)
        manifest_text = raw.attrs.get("manifest", "")
        manifest_text = manifest_text.decode() if isinstance(manifest_text, bytes) else str(manifest_text)
    with FeatureStore(source) as store:
        create_store(target, ids=store.ids, labels=store.labels, splits=store.split, classes=store.classes,
                     manifest_sha256=store.manifest_sha256, manifest_json=manifest_text,
                     catalog_spec=store.attrs.get("catalog") or {})
        for name, info in store.feature_sets.items():
            if info.layer != "pooled":
                continue
            keep = ("complete", "dtype", "chunk_rows", "layer", "manifest_sha256", "feature_dim")
            provenance = {k: v for k, v in info.provenance.items() if k not in keep}
            status = store.status(name)
            with FeatureSetWriter(target, modality=info.modality, source=info.source, layers={"pooled": info.dim},
                                  provenance={"pooled": provenance}, add=True, dtype="float16") as writer:
                dataset = store.dataset(name)
                for start in range(0, len(status), COPY_BLOCK):
                    rows = np.arange(start, min(len(status), start + COPY_BLOCK))
                    values = dataset[rows[0]:rows[-1] + 1][status[rows] == STATUS_OK]
                    writer.write(rows, {"pooled": values}, status[rows])
                writer.finish()
    return target


def summarise(rows: list[dict]) -> dict[str, tuple[float, float, int]]:
    cells: dict[str, list[float]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(100 * row["test_accuracy"])
    return {cell: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for cell, v in sorted(cells.items())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategies", default="2A,2B")
    p.add_argument("--fusions", default="concat")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--baselines", action="store_true")
    p.add_argument("--report", type=Path)
    args = p.parse_args(argv)
    command = "python benchmarks/float16_accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    args.out.mkdir(parents=True, exist_ok=True)
    half = args.out / "store-float16.h5"
    if not half.exists():
        float16_copy(args.store, half)
    settings = SweepSettings(strategies=tuple(args.strategies.split(",")), fusions=tuple(args.fusions.split(",")),
                             seeds=tuple(int(s) for s in args.seeds.split(",")), baselines=args.baselines,
                             device="cpu", train=TrainSettings())
    results = {}
    for dtype, store in (("float32", args.store), ("float16", half)):
        run_sweep(store, args.out / f"results-{dtype}", settings, log=print)
        results[dtype] = summarise(read_runs(args.out / f"results-{dtype}"))
    lines = [f"Command: `{command}`", "",
             "| cell | float32 test accuracy % | float16 test accuracy % | difference (points) | seeds |",
             "|---|---:|---:|---:|---:|"]
    for cell, (mean32, std32, n) in results["float32"].items():
        mean16, std16, _ = results["float16"][cell]
        lines.append(f"| {cell} | {mean32:.2f} ± {std32:.2f} | {mean16:.2f} ± {std16:.2f} | {mean16 - mean32:+.2f} "
                     f"| {n} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)


if __name__ == "__main__":
    main()
