"""Decision-level models (LR-*, LF, ST) beside the heads: the scikit-learn solver vs the torch solver, in one run,
on one store (issue #18).

    python benchmarks/bench_decision.py --store runs/real/store.h5            # the protocol store
    python benchmarks/bench_decision.py --synthetic                           # store-shaped random data

1. The solver on one problem (LR-image's: the store's image train / val rows): numpy's and torch's matmul
   GFLOP/s at its shape; a cProfile of scikit-learn's fit (where its time goes); the C grid by scikit-learn (a
   warm-started path) and by torch in float64 / float32, as a warm-started path / as one stack of all Cs: seconds,
   L-BFGS iterations, largest coefficient difference to scikit-learn's, validation predictions that differ (float64
   as a stack: ~2x the iterations of the hardest C alone, as in float32, so not repeated here); and
   ST's 5 out-of-fold fits by each (torch: one stack, started from the full-train fit or from zero).
2. Whole sweeps of the default grid, alternated so that a change in the machine's load hits all alike (the
   `--order`, default H T S S T H: H = the heads-only grid, T / S = the default grid with the torch / sklearn
   solver; each a fresh results folder): wall seconds, the decision phase's seconds, the ratio of each default
   grid to the heads-only grid, and each decision model's test accuracy under both solvers (ST: mean and seed
   spread over the seeds).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import heads.sweep as sweep_module  # noqa: E402
from bench_sweep import synthetic_store  # noqa: E402
from heads.decision import LinearSettings, _as_linear, _out_of_fold  # noqa: E402
from heads.grid import build_grid  # noqa: E402
from heads.logistic import fit_multinomial, standardization  # noqa: E402
from heads.strategies import get_strategy  # noqa: E402
from heads.results import read_runs  # noqa: E402
from heads.sweep import SweepSettings, run_sweep  # noqa: E402


def image_problem(store_path: Path):
    """LR-image's arrays: (train x, train y, val x, val y), float64."""
    from embedstore.store import FeatureStore
    with FeatureStore(store_path) as store:
        name = next(n for n, s in store.feature_sets.items() if s.modality == "image" and n.endswith("/pooled"))
        text = next(n for n, s in store.feature_sets.items() if s.modality == "text" and n.endswith("/pooled"))
        data = store.load([name, text])
        n_classes = len(store.classes)
    # the rows ok in both sets (the decision models' rows: 2-A's)
    x, y, split = data.features[name].astype(np.float64), np.asarray(data.labels), np.asarray(data.split)
    train, val = split == "train", split == "val"
    return x[train], y[train], x[val], y[val], n_classes, name


def gflops(f, flops: float, repeats: int = 5) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    return flops * repeats / (time.perf_counter() - t0) / 1e9


def solver_details(store_path: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    x, y, xv, yv, k, name = image_problem(store_path)
    n, d = x.shape
    print(f"\n## 1. The solver on LR-image's problem ({name}: {n} train rows x {d}, {k} classes; torch threads "
          f"{threads})\n")
    mean, scale = standardization(x)
    z = (x - mean) / scale
    w = np.random.default_rng(0).normal(size=(d, k))
    flops = 2 * n * d * k
    zt, wt = torch.from_numpy(z), torch.from_numpy(w)
    z32, w32 = zt.float(), wt.float()
    print(f"matmul (n, D) @ (D, C): numpy (OpenBLAS) {gflops(lambda: z @ w, flops):.1f} GFLOP/s; torch (MKL) float64 "
          f"{gflops(lambda: zt @ wt, flops):.1f}; torch float32 {gflops(lambda: z32 @ w32, flops):.1f}")

    from sklearn.linear_model import LogisticRegression
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    lr = LogisticRegression(C=0.01, max_iter=500).fit(z, y)
    profile.disable()
    seconds = time.perf_counter() - t0
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(4)
    top = [line for line in text.getvalue().splitlines() if line.strip()[:1].isdigit()][-4:]
    print(f"\ncProfile of one scikit-learn fit (C = 0.01, {lr.n_iter_[0]} iterations, {seconds:.1f} s), "
          f"functions by own time:\n```\n" + "\n".join(top) + "\n```")

    settings = LinearSettings(solver="sklearn")
    ref_path, scores = {}, []   # sklearn's path (as decision.py walks it), for the comparisons below
    lr = LogisticRegression(max_iter=500, warm_start=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for C in settings.c_grid:
            lr.set_params(C=C).fit(z, y)
            predicted = lr.predict((xv - mean) / scale)
            ref_path[C] = (lr.coef_.copy(), predicted, _as_linear(lr, mean, scale, k))
            scores.append(((predicted == yv).mean(), C))
    ref_seconds = time.perf_counter() - t0
    ref_acc, ref_C = max(scores, key=lambda s: (s[0], -s[1]))   # decision.py's rule (its log-loss tie-break aside)
    ref_model = ref_path[ref_C][2]
    print(f"\n| C grid {settings.c_grid} by | seconds | iterations | max abs coef diff vs sklearn (max abs coef) "
          f"| val predictions differing | chosen C, val acc |")
    print("|---|---|---|---|---|---|")
    print(f"| sklearn, warm-started path | {ref_seconds:.1f} | | | | {ref_model.C}, {ref_acc:.4f} |")
    for dtype, stacked in ((torch.float64, False), (torch.float32, False), (torch.float32, True)):
        t0 = time.perf_counter()
        if stacked:
            fits = fit_multinomial(x, y, k, settings.c_grid, dtype=dtype)
        else:
            fits, start = [], None
            for C in settings.c_grid:
                (fit,) = fit_multinomial(x, y, k, [C], init=[start], dtype=dtype)
                fits.append(fit)
                start = fit
        secs = time.perf_counter() - t0
        diffs, differ, scores = [], 0, []
        for fit in fits:
            coef, predicted, _ = ref_path[fit.C]
            diffs.append(f"{np.abs(fit.coef - coef).max():.1e} ({np.abs(coef).max():.2f})")
            pv = ((xv - fit.mean) / fit.scale) @ fit.coef.T + fit.intercept
            differ += int((pv.argmax(1) != predicted).sum())
            scores.append(((pv.argmax(1) == yv).mean(), fit.C))
        best = max(scores, key=lambda s: (s[0], -s[1]))
        iters = "+".join(str(f.n_iter) for f in fits) if not stacked else str(fits[0].n_iter)
        print(f"| torch {str(dtype)[6:]}, {'one stack of all Cs' if stacked else 'warm-started path'} | "
              f"{secs:.1f} | {iters} | {', '.join(diffs)} | {differ} of {len(fits) * len(yv)} | "
              f"{best[1]}, {best[0]:.4f} (converged: {all(f.converged for f in fits)}) |")

    print("\nST's out-of-fold fits (5 stratified folds, seed 0, C of the full-train fit):\n")
    print("| by | seconds | converged | max abs difference of out-of-fold probabilities vs sklearn |")
    print("|---|---|---|---|")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ok = _out_of_fold(x, y, ref_model.C, k, 5, 0, 500, solver="sklearn", start=None, device="cpu")
    print(f"| sklearn, one fold after another | {time.perf_counter() - t0:.1f} | {ok} | |")
    for label, start in (("torch float32, one stack, started from the full-train fit", ref_model),
                         ("torch float32, one stack, started from zero", None)):
        t0 = time.perf_counter()
        oof, ok = _out_of_fold(x, y, ref_model.C, k, 5, 0, 500, solver="torch", start=start, device="cpu")
        print(f"| {label} | {time.perf_counter() - t0:.1f} | {ok} | {np.abs(np.exp(oof) - np.exp(ref)).max():.1e} |")


def heads_only(store_path: Path) -> tuple[str, ...]:
    """The default grid's head strategies (what `heads sweep` trains with no options, minus the linear ones)."""
    from embedstore.store import FeatureStore
    with FeatureStore(store_path) as store:
        cells, _ = build_grid(store, strategies=None, fusions=None, baselines=True)
    return tuple(dict.fromkeys(c.strategy for c in cells if get_strategy(c.strategy).trainer == "head"
                               and get_strategy(c.strategy).multimodal))


def sweeps(store_path: Path, order: str, seeds: tuple[int, ...], tmp: Path) -> None:
    print(f"\n## 2. Whole sweeps, order {' '.join(order)} (H: heads-only grid; T / S: default grid, torch / "
          f"sklearn solver)\n")
    phase = {}
    original = sweep_module.fit_decisions

    def timed_decision(*args, **kwargs):   # the decision phase's wall time (beside the heads with --jobs > 1)
        t0 = time.perf_counter()
        original(*args, **kwargs)
        phase["decision"] = phase.get("decision", 0.0) + time.perf_counter() - t0

    sweep_module.fit_decisions = timed_decision
    strategies = heads_only(store_path)
    times, decision_times, rows = {}, {}, {}
    for i, run in enumerate(order):
        settings = SweepSettings(strategies=strategies if run == "H" else None, seeds=seeds, progress=False,
                                 linear=LinearSettings(solver={"T": "torch", "S": "sklearn"}.get(run, "torch")))
        phase.clear()
        t0 = time.perf_counter()
        summary = run_sweep(store_path, tmp / f"{run}-{i}", settings, log=lambda _: None)
        seconds = time.perf_counter() - t0
        times.setdefault(run, []).append(seconds)
        decision_times.setdefault(run, []).append(phase.get("decision", 0.0))
        rows.setdefault(run, []).append(read_runs(tmp / f"{run}-{i}"))
        print(f"run {i + 1} ({run}): {seconds:.1f} s, decision phase {phase.get('decision', 0.0):.1f} s; trained "
              f"{summary['trained_by_kind']}", flush=True)
    names = {"H": "heads-only grid", "T": "default grid, torch solver", "S": "default grid, sklearn solver"}
    heads_mean = np.mean(times["H"]) if "H" in times else None
    print("\n| grid | runs (s) | mean (s) | decision phase (s) | / heads-only |")
    print("|---|---|---|---|---|")
    for run in ("H", "T", "S"):
        if run in times:
            ratio = f"{np.mean(times[run]) / heads_mean:.2f}x" if heads_mean else ""
            print(f"| {names[run]} | {', '.join(f'{t:.1f}' for t in times[run])} | {np.mean(times[run]):.1f} | "
                  f"{', '.join(f'{t:.1f}' for t in decision_times[run])} | {ratio} |")
    if "T" in rows and "S" in rows:
        accuracy_table(rows["S"][0], rows["T"][0])


def accuracy_table(sklearn_rows: list[dict], torch_rows: list[dict]) -> None:
    """Each decision model's test accuracy under both solvers: mean over seeds, and the seed spread (std)."""
    def by_cell(rows):
        out = {}
        for r in rows:
            if r["config"].get("kind") == "linear":
                out.setdefault(r["cell"], []).append(r)
        return out
    s, t = by_cell(sklearn_rows), by_cell(torch_rows)
    print("\n| model | sklearn test % (mean ± std over seeds) | torch test % | torch - sklearn | chosen (sklearn / torch) "
          "| converged (sklearn / torch) |")
    print("|---|---|---|---|---|---|")
    for cell in s:
        a = np.array([r["test_accuracy"] for r in s[cell]])
        b = np.array([r["test_accuracy"] for r in t.get(cell, [])])
        chosen = [{k: v for k, v in r["chosen"].items() if k in ("C", "C_image", "C_text", "C_stack", "w")}
                  for r in (s[cell][0], t[cell][0])]
        conv = [all(r["chosen"].get("converged", True) for r in rows) for rows in (s[cell], t[cell])]
        print(f"| {cell} | {100 * a.mean():.2f} ± {100 * a.std():.2f} | {100 * b.mean():.2f} ± {100 * b.std():.2f} | "
              f"{100 * (b.mean() - a.mean()):+.2f} | {chosen[0]} / {chosen[1]} | {conv[0]} / {conv[1]} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, help="an existing feature store (pooled image and text features)")
    src.add_argument("--synthetic", action="store_true", help="generate a store of the protocol's sizes first")
    p.add_argument("--order", default="HTSSTH", help="the sweeps, in order: H heads-only, T torch, S sklearn")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1, help="torch threads in part 1 (the sweep uses its default, 1)")
    p.add_argument("--skip-details", action="store_true", help="only part 2")
    p.add_argument("--out", type=Path, default=None, help="keep each run's results folder here (default: temporary)")
    args = p.parse_args(argv)
    if set(args.order) - set("HTS"):
        p.error(f"--order takes H, T and S, got {args.order!r}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.out or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        store = args.store or synthetic_store(tmp / "synthetic.h5")
        print(f"store: {'synthetic 9,250 x (1280 | 384), 37 classes' if args.synthetic else args.store}")
        if not args.skip_details:
            solver_details(store, args.threads)
        sweeps(store, args.order, tuple(int(s) for s in args.seeds.split(",")), tmp)
    print(f"\nwhole benchmark: {time.perf_counter() - start:.0f} s")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    main()
