"""Batched vs one-head-at-a-time training of the same sweep grid, in one run, on one store.

    python benchmarks/bench_sweep.py --synthetic                      # store-shaped random data of the real sizes
    python benchmarks/bench_sweep.py --store runs/store.h5 --compare jobs       # --jobs 1 vs --jobs 2
    python benchmarks/bench_sweep.py --store runs/store.h5 --compare precision  # fp32 vs bf16, cell by cell
    python benchmarks/bench_sweep.py --synthetic --compare grouping --repeats 2 # cells of one shape in one step
                                                                               # vs one stacked step per cell

Two sweeps of the same grid, back to back in one process: their wall times and ratio, the GFLOP/s each reached
beside a matmul peak measured in the same run, whether both gave the same rows (or, for precision, whether each
cell's bf16 accuracy is within its fp32 seed spread), and the command line. `--repeats N` alternates the two
runs (A B B A ...) so that a change in the machine's load hits both alike; times are each run's total and the
ratio is of the totals.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.results import read_runs  # noqa: E402
from heads.sweep import SweepSettings, run_sweep  # noqa: E402
from heads.train import TrainSettings  # noqa: E402


def synthetic_store(path: Path, *, classes: int = 37, per_class=(175, 25, 50), d_img: int = 1280, d_txt: int = 384,
                    seed: int = 0) -> Path:
    """The protocol's sizes (37 x 250 = 9,250 items, 6,475 / 925 / 1,850) with class-dependent Gaussian
    features: pooled backbone features, 500-d module 'dense' and C-d 'classifier' features. Noise is set so
    heads need several epochs, like real features, rather than separating everything at once."""
    from embedstore.store_writer import write_store_from_arrays

    rng = np.random.default_rng(seed)
    labels, splits = [], []
    for c in range(classes):
        for name, k in zip(("train", "val", "test"), per_class):
            labels += [c] * k
            splits += [name] * k
    y = np.array(labels)

    def feats(dim, noise):
        return (rng.normal(size=(classes, dim))[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32)

    features = {
        "image/synthetic-image/pooled": (feats(d_img, 6.0), {"parameters": 3_400_000}),
        "text/synthetic-text/pooled": (feats(d_txt, 4.0), {"parameters": 22_700_000}),
        "image/synthetic-image-module/dense": (feats(500, 3.0), {"parameters": 3_400_000 + 640_500 + 18_537}),
        "image/synthetic-image-module/classifier": (feats(classes, 1.0), {"parameters": 3_400_000 + 640_500 + 18_537}),
        "text/synthetic-text-module/dense": (feats(500, 2.0), {"parameters": 22_700_000 + 192_500 + 18_537}),
        "text/synthetic-text-module/classifier": (feats(classes, 0.8), {"parameters": 22_700_000 + 192_500 + 18_537}),
    }
    return write_store_from_arrays(path, ids=[str(i) for i in range(len(y))], labels=y, splits=splits,
                                   classes=[f"class{c}" for c in range(classes)], features=features,
                                   manifest_sha256=f"synthetic-seed{seed}")


COMPARISONS = {
    # name: (label, settings overrides) for each of the two runs timed back to back in one process
    "batching": [("batched", {"batched": True, "jobs": 1}), ("sequential", {"batched": False, "jobs": 1})],
    "jobs": [("jobs=1", {"jobs": 1}), ("jobs=2", {"jobs": 2})],
    "precision": [("fp32", {"precision": "fp32"}), ("bf16", {"precision": "bf16"})],
    "grouping": [("grouped", {"group_cells": True, "jobs": 1}), ("per-cell", {"group_cells": False, "jobs": 1})],
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, help="an existing feature store")
    src.add_argument("--synthetic", action="store_true", help="generate a store of the real sizes first")
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="batching",
                   help="batching: stacked vs one head at a time; jobs: --jobs 1 vs --jobs 2; precision: fp32 vs "
                        "bf16; grouping: cells of one shape in one step vs one step per cell")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, alternated A B B A ...")
    p.add_argument("--strategies", default=None, help="default: every strategy the store allows")
    p.add_argument("--fusions", default=None, help="default: every registered operator")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--max-epochs", type=int, default=TrainSettings.max_epochs)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="keep each run's results folder here (default: temporary)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.out or tmp)
        store = args.store or synthetic_store(tmp / "synthetic.h5")
        base = dict(strategies=tuple(args.strategies.split(",")) if args.strategies else None,
                    fusions=tuple(args.fusions.split(",")) if args.fusions else None,
                    seeds=tuple(int(s) for s in args.seeds.split(",")), baselines=not args.no_baselines,
                    device=args.device, threads=args.threads, progress=False,
                    measure_peak=True)
        times, rows, summaries, each = {}, {}, {}, {}
        pair = COMPARISONS[args.compare]
        order = [pair[(r + i) % 2 if r % 2 else i] for r in range(args.repeats) for i in range(2)]   # A B B A
        for rep, (label, overrides) in enumerate(order):
            overrides = dict(overrides)
            train = TrainSettings(max_epochs=args.max_epochs, precision=overrides.pop("precision", "auto"))
            settings = SweepSettings(**{**base, **overrides, "train": train})
            folder = tmp / f"{label.replace('=', '')}-{rep}"
            t0 = time.perf_counter()
            summaries[label] = run_sweep(store, folder, settings,
                                         log=lambda line, label=label: print(f"  [{label}] {line}", flush=True))
            each.setdefault(label, []).append(time.perf_counter() - t0)
            times[label] = sum(each[label])
            rows[label] = {r["run_key"] if args.compare != "precision" else (r["cell"], r["seed"]): r
                           for r in read_runs(folder)}

    first, second = [label for label, _ in COMPARISONS[args.compare]]
    trained = [r for r in rows[first].values() if r["epochs_run"] is not None]   # decision-level rows have none
    heads = len(trained)
    epochs = sum(r["epochs_run"] for r in trained)
    print(f"\nstore: {'synthetic 9,250 x (1280 | 384), 37 classes' if args.synthetic else args.store}")
    print(f"grid: {heads} heads, {epochs} head-epochs in total, {len(rows[first]) - heads} decision-level rows; "
          f"device {args.device}")
    for label in (first, second):
        s = summaries[label]
        runs = len(each[label])
        print(f"{label:>10}: {times[label]:.1f} s in {runs} run(s) ({', '.join(f'{t:.1f}' for t in each[label])} s; "
              f"{times[label] / runs / heads:.2f} s per head); training matmuls "
              f"{s.get('gflops', 0):.1f} GFLOP/s ({s.get('precision')}), {s['jobs']} job(s), matmul peak measured in "
              f"the same run {s.get('peak_gflops', 0):.1f} GFLOP/s on {s['jobs']} core(s) = "
              f"{100 * s.get('gflops', 0) / max(s.get('peak_gflops', 1), 1e-9):.0f} %")
    print(f"ratio {first} / {second} wall time: {times[first] / times[second]:.2f}x")
    if args.compare != "precision":
        same = rows[first].keys() == rows[second].keys() and all(
            rows[second][k]["test_accuracy"] == r["test_accuracy"] and rows[second][k]["best_epoch"] == r["best_epoch"]
            for k, r in rows[first].items())
        print(f"same run keys and metrics in both runs: {same}")
    else:
        print_precision_table(rows[first], rows[second])
    best = max(rows[first].values(), key=lambda r: r["test_accuracy"])
    print(f"best test accuracy ({first}): {best['test_accuracy']:.4f} ({best['cell']}, seed {best['seed']})")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))


def print_precision_table(fp32: dict, bf16: dict) -> None:
    """Per cell: mean test accuracy in each precision, the difference, and the cell's seed spread (fp32 std);
    the verdict the README's precision rule needs: is every difference within its cell's spread?"""
    cells = sorted({cell for cell, _ in fp32})
    print("\n| cell | fp32 mean % | bf16 mean % | bf16 - fp32 | fp32 seed std | within spread |")
    print("|---|---|---|---|---|---|")
    verdicts = []
    for cell in cells:
        a = np.array([r["test_accuracy"] for (c, _), r in fp32.items() if c == cell])
        b = np.array([r["test_accuracy"] for (c, _), r in bf16.items() if c == cell])
        spread = float(a.std(ddof=1)) if len(a) > 1 else 0.0
        diff = float(b.mean() - a.mean())
        ok = abs(diff) <= spread
        verdicts.append(ok)
        print(f"| {cell} | {100 * a.mean():.2f} | {100 * b.mean():.2f} | {100 * diff:+.2f} | {100 * spread:.2f} | "
              f"{'yes' if ok else 'NO'} |")
    print(f"\nevery cell within its seed spread: {all(verdicts)} ({sum(verdicts)} of {len(verdicts)})")


if __name__ == "__main__":
    main()
