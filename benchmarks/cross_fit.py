"""1-A / 1-B heads over fine-tuned modules with and without cross-fitting (`embed finetune --cross-fit K`).

    python benchmarks/cross_fit.py --manifest M0/manifest.json --store M0/store.h5 \
        --manifest M1/manifest.json --store M1/store.h5 --work /tmp/crossfit/bench --k 5

Per manifest: image S2 and text S2 modules (over the store's pooled features), once plain and once with
--cross-fit K (the same seed, so the full modules are the same weights: only the training rows' features
differ); each pair's dense + classifier features extracted into its own copy of the store (the given store is
only read); then `heads sweep --strategies 1A,1B` (every fusion operator, seeds 0,1,2, no baselines) over each.
Prints and writes (--out) a Markdown table: test accuracy mean +- std per (strategy, operator), with and without,
over every (manifest, seed) row; plus per manifest. Everything is resumable: finished modules, features and
heads are skipped when rerun with the same --work.
"""
from __future__ import annotations

import argparse
import functools
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.extract import extract  # noqa: E402
from embedstore.extract_plan import ExtractSettings  # noqa: E402
from embedstore.finetune import FinetuneSettings, finetune  # noqa: E402
from embedstore.model_folder import read_config  # noqa: E402
from heads.results import read_runs  # noqa: E402
from heads.sweep import SweepSettings, run_sweep  # noqa: E402

VARIANTS = {"plain": None, "cross-fit": "k"}


def modules_for(manifest: Path, store: Path, work: Path, k: int | None, image_size: int, log) -> dict[str, Path]:
    out = {}
    for modality in ("image", "text"):
        folder = work / f"{modality}-s2" if k is None else work / f"{modality}-s2-cf{k}"
        config = folder / "config.json"
        finished = config.is_file() and (k is None or read_config(folder).get("cross_fit"))
        if not finished:
            start = time.perf_counter()
            metrics = finetune(manifest, folder, FinetuneSettings(
                modality=modality, strategy=2, image_size=image_size, seed=0, cross_fit=k, progress=False,
                device="cpu"), store_path=store).metrics
            log(f"  {folder.name}: test accuracy {metrics['test_accuracy']:.4f} ({time.perf_counter() - start:.0f} s)")
        out[modality] = folder
    return out


def run_manifest(manifest: Path, store: Path, work: Path, k: int, image_size: int, jobs: int, log) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in VARIANTS:
        kk = k if variant == "cross-fit" else None
        log(f"{manifest}: {variant}")
        modules = modules_for(manifest, store, work, kk, image_size, log)
        copy = work / f"store-{variant}.h5"
        done = work / f"store-{variant}.done"
        if not done.is_file():
            shutil.copyfile(store, copy)  # module features go into our copy, never into the given store
            extract(manifest, copy, ExtractSettings(image_backbone=None, text_backbone=None, progress=False,
                                                    image_module=str(modules["image"]),
                                                    text_module=str(modules["text"]), device="cpu"))
            done.write_text("ok\n")
        out = work / f"heads-{variant}"
        run_sweep(copy, out, SweepSettings(strategies=("1A", "1B"), baselines=False, seeds=(0, 1, 2), device="cpu",
                                           jobs=jobs, progress=False), log=lambda line: None)
        results[variant] = [row for row in read_runs(out) if row["strategy"] in ("1A", "1B")]
    return results


def table(rows_by_variant: dict[str, list[dict]]) -> list[str]:
    cells = sorted({row["cell"] for rows in rows_by_variant.values() for row in rows})
    lines = ["| cell | plain: test acc % (mean +- std, n) | cross-fit: test acc % (mean +- std, n) | difference |",
             "|---|---|---|---|"]
    for cell in cells:
        stats = {}
        for variant in VARIANTS:
            values = np.array([row["test_accuracy"] for row in rows_by_variant.get(variant, [])
                               if row["cell"] == cell]) * 100
            stats[variant] = (values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0, len(values)) \
                if len(values) else None
        shown = [f"{s[0]:.2f} +- {s[1]:.2f} ({s[2]})" if s else "not run" for s in stats.values()]
        p, c = stats["plain"], stats["cross-fit"]
        lines.append(f"| {cell} | {shown[0]} | {shown[1]} | {f'{c[0] - p[0]:+.2f}' if p and c else ''} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", action="append", type=Path, required=True)
    parser.add_argument("--store", action="append", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown tables here too")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tables from the heads already in --work (an unfinished run)")
    args = parser.parse_args(argv)
    # one thread: on a shared 2-core machine OpenMP barriers stall whenever the other core is busy (sweep.py)
    torch.set_num_threads(1)
    if len(args.manifest) != len(args.store):
        parser.error("give one --store per --manifest")
    start = time.perf_counter()
    per_manifest = {}
    for index, (manifest, store) in enumerate(zip(args.manifest, args.store)):
        work = args.work / f"manifest-{index}"
        if args.report_only:
            per_manifest[str(manifest)] = {v: [r for r in read_runs(work / f"heads-{v}")
                                               if r["strategy"] in ("1A", "1B")]
                                           for v in VARIANTS if (work / f"heads-{v}" / "runs.jsonl").is_file()}
            continue
        per_manifest[str(manifest)] = run_manifest(manifest, store, work, args.k, args.image_size, args.jobs,
                                                   functools.partial(print, flush=True))
    lines = [f"command: `python {shlex.join(['benchmarks/cross_fit.py', *(argv or sys.argv[1:])])}`", "",
             f"## All manifests x seeds 0,1,2 (K = {args.k})", "",
             *table({v: [r for res in per_manifest.values() for r in res.get(v, [])] for v in VARIANTS})]
    for manifest, results in per_manifest.items():
        lines += ["", f"## {manifest}", "", *table(results)]
    lines += ["", f"wall time {time.perf_counter() - start:.0f} s"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        (args.out.with_suffix(".json")).write_text(json.dumps(
            {m: {v: [{k: r[k] for k in ("cell", "seed", "test_accuracy", "best_val_accuracy")} for r in rows]
                 for v, rows in res.items()} for m, res in per_manifest.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
