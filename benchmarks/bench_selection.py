"""The cost of choosing by K-fold cross-validation (heads/cv_select.py) against choosing by validation, on a
synthetic store of the paper's shape (37 classes x 175/25/50 items; image 500-d, text 37-d features).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_selection.py --out /tmp/selection [--folds 5]

Sweeps a small grid (2A/2B concat + product, the baselines, LR-concat, LF; seed 0), then times, back to back:
`heads ensemble --select validation`, `heads ensemble --select cv:K` and `heads select --select cv:K`, and prints
the chosen models' validation, CV and test accuracies. Results: benchmarks/results/selection_cost.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from store_factory import make_feature_store  # noqa: E402

from heads.ensemble import ensemble  # noqa: E402
from heads.select import format_selection_table, select_model  # noqa: E402
from heads.sweep import SweepSettings, run_sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--classes", type=int, default=37)
    parser.add_argument("--per-class", default="175,25,50")
    parser.add_argument("--dims", default="500,37")
    parser.add_argument("--separation", default="0.12,0.35", help="image, text class-mean scale (noise 1)")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    per_class = tuple(int(x) for x in args.per_class.split(","))
    dims = [int(x) for x in args.dims.split(",")]
    sep = [float(x) for x in args.separation.split(",")]
    image, text = "image/img/pooled", "text/txt/pooled"
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "store.h5"
    if not store.exists():
        make_feature_store(store, classes=args.classes, per_class=per_class, features={image: dims[0], text: dims[1]},
                           separation={image: sep[0], text: sep[1]}, provenance={image: {"parameters": 0},
                                                                                 text: {"parameters": 0}})
    results = args.out / "results"
    start = time.perf_counter()
    summary = run_sweep(store, results, SweepSettings(strategies=("2A", "2B", "image", "text", "LR-concat", "LF"),
                                                      fusions=("concat", "product"), seeds=(0,), device="cpu",
                                                      jobs=1, progress=False), log=lambda _: None)
    sweep_seconds = time.perf_counter() - start
    timings = {"sweep_seconds": sweep_seconds, "sweep_trained": summary["trained"]}
    for select in ("validation", f"cv:{args.folds}"):
        (results / "ensembles.jsonl").unlink(missing_ok=True)
        start = time.perf_counter()
        row = ensemble(results, top_k="auto", select=select, log=lambda _: None)
        timings[f"ensemble {select}"] = time.perf_counter() - start
        timings[f"ensemble {select} row"] = {k: row.get(k) for k in ("k", "pool", "members", "val_accuracy",
                                                                      "cv_accuracy", "test_accuracy",
                                                                      "selection_seconds")}
    start = time.perf_counter()
    doc = select_model(results, f"cv:{args.folds}", log=lambda _: None)
    timings[f"select cv:{args.folds}"] = time.perf_counter() - start
    timings["refit_seconds"] = {c["member"]: round(c["refit_seconds"], 2) for c in doc["candidates"]}
    timings["choices"] = {"validation": doc["by_validation"], "cv": doc["by_cv"]}
    (args.out / "selection_cost.json").write_text(json.dumps(timings, indent=1, default=str))
    print(json.dumps(timings, indent=1, default=str))
    print(format_selection_table(doc, top=20))


if __name__ == "__main__":
    main()
