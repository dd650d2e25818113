"""Batched vs one-head-at-a-time training of the same sweep grid, in one run, on one store.

    python benchmarks/bench_sweep.py --synthetic            # store-shaped random data of the real sizes
    python benchmarks/bench_sweep.py --store runs/store.h5  # a real store (needs 1A/1B features for those)

Prints both wall times, their ratio, whether the two paths gave the same metrics, and the command line.
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

from heads.sweep import SweepSettings, read_runs, run_sweep  # noqa: E402
from heads.train import TrainSettings  # noqa: E402


def synthetic_store(path: Path, *, classes: int = 37, per_class=(175, 25, 50), d_img: int = 1280, d_txt: int = 384,
                    seed: int = 0) -> Path:
    """The protocol's sizes (37 x 250 = 9,250 items, 6,475 / 925 / 1,850) with class-dependent Gaussian
    features: pooled backbone features, 500-d module 'dense' and C-d 'classifier' features. Noise is set so
    heads need several epochs, like real features, rather than separating everything at once."""
    from embedstore.store import write_store_from_arrays

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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, help="an existing feature store")
    src.add_argument("--synthetic", action="store_true", help="generate a store of the real sizes first")
    p.add_argument("--strategies", default="1A,1B,2A,2B")
    p.add_argument("--fusions", default="add,average,product,concat,gated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--max-epochs", type=int, default=TrainSettings.max_epochs)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-sequential", action="store_true", help="time the batched path only")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = args.store or synthetic_store(tmp / "synthetic.h5")
        settings = SweepSettings(strategies=tuple(args.strategies.split(",")), fusions=tuple(args.fusions.split(",")),
                                 seeds=tuple(int(s) for s in args.seeds.split(",")), baselines=not args.no_baselines,
                                 device=args.device, threads=args.threads,
                                 train=TrainSettings(max_epochs=args.max_epochs))
        times, rows = {}, {}
        for mode in ("batched",) + (() if args.skip_sequential else ("sequential",)):
            s = SweepSettings(**{**settings.__dict__, "batched": mode == "batched"})
            t0 = time.perf_counter()
            run_sweep(store, tmp / mode, s, log=lambda line: print(f"  [{mode}] {line}", flush=True))
            times[mode] = time.perf_counter() - t0
            rows[mode] = {(r["cell"], r["seed"]): r for r in read_runs(tmp / mode)}

    heads = len(rows["batched"])
    epochs = sum(r["epochs_run"] for r in rows["batched"].values())
    # A lower bound on the matmul work: forward + weight gradient = 4 FLOP per weight per training example
    gflop = sum(4 * r["store"]["split_rows"]["train"] * r["trainable_parameters"] * r["epochs_run"]
                for r in rows["batched"].values()) / 1e9
    print(f"\nstore: {'synthetic 9,250 x (1280 | 384), 37 classes' if args.synthetic else args.store}")
    print(f"grid: {heads} heads, {epochs} head-epochs in total; {args.threads} threads, device {args.device}")
    print(f"matmul work: at least {gflop:,.0f} GFLOP (4 x train rows x weights x epochs, summed over heads)")
    print(f"batched:    {times['batched']:.1f} s  ({times['batched'] / heads:.2f} s per head, "
          f">= {gflop / times['batched']:.0f} GFLOP/s)")
    if "sequential" in times:
        same = all(abs(rows["batched"][k]["test_accuracy"] - r["test_accuracy"]) < 1e-12 and
                   rows["batched"][k]["best_epoch"] == r["best_epoch"] for k, r in rows["sequential"].items())
        print(f"sequential: {times['sequential']:.1f} s  ({times['sequential'] / heads:.2f} s per head)")
        print(f"ratio sequential / batched: {times['sequential'] / times['batched']:.2f}x; "
              f"same metrics on both paths: {same}")
    best = max(rows["batched"].values(), key=lambda r: r["test_accuracy"])
    print(f"best test accuracy: {best['test_accuracy']:.4f} ({best['cell']}, seed {best['seed']})")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    main()
