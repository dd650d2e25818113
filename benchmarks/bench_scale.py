"""Sweep time per epoch and peak memory against store size: in memory vs streamed, float32 vs float16.

    python benchmarks/bench_scale.py --out runs/scale --rows 10000,100000,1000000 --classes 37 \
        --json benchmarks/results/scale.json --png benchmarks/results/scale.png

For each size it writes a synthetic store (1280-d image + 384-d text pooled features, class-dependent Gaussians,
rows in manifest order: class by class, 70/10/20 train/val/test within a class) block by block through the store
writer (the whole matrix is never in memory), once as float32 and once as float16. Each measurement is one
`heads sweep` (2B-concat, one seed, --max-epochs EPOCHS, one thread) in a fresh process, which reports its own
peak RSS (getrusage) and the sweep row's time per epoch (training + validation). In-memory runs use a budget
above the matrix, streamed runs `--memory-budget` min(--stream-budget, matrix bytes - 1) (below the in-memory
need of 2x the matrix, so small stores stream too; 1GB for 1M rows). An in-memory run the machine's free memory
cannot hold is skipped and reported as such. Stores are deleted afterwards unless --keep-stores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIMS = {"image/synthetic/pooled": 1280, "text/synthetic/pooled": 384}
FRACTIONS = (0.7, 0.1, 0.2)
WRITE_BLOCK = 16_384


def write_store(path: Path, *, rows: int, classes: int, dtype: str, seed: int = 0) -> Path:
    """A synthetic store of `rows` items written in blocks of WRITE_BLOCK rows."""
    from embedstore.store import STATUS_OK
    from embedstore.store_writer import FeatureSetWriter, create_store

    per_class = np.full(classes, rows // classes)
    per_class[: rows % classes] += 1
    labels = np.repeat(np.arange(classes), per_class)
    splits = np.concatenate([np.repeat(["train", "val", "test"], _split(n)) for n in per_class])
    create_store(path, ids=(str(i) for i in range(rows)), labels=labels, splits=splits,
                 classes=[f"class{c}" for c in range(classes)], manifest_sha256=f"synthetic-{rows}-{classes}-{seed}")
    rng = np.random.default_rng(seed)
    for name, dim in DIMS.items():
        modality, source, layer = name.split("/")
        means = rng.normal(size=(classes, dim)).astype(np.float32) * 0.4   # (C, D)
        provenance = {layer: {"backbone": "synthetic", "weights_id": "synthetic", "preprocessing": {},
                              "parameters": 0}}
        with FeatureSetWriter(path, modality=modality, source=source, layers={layer: dim}, provenance=provenance,
                              add=True, dtype=dtype) as writer:
            for start in range(0, rows, WRITE_BLOCK):
                stop = min(rows, start + WRITE_BLOCK)
                block = rng.standard_normal((stop - start, dim), dtype=np.float32)   # (b, D)
                block += means[labels[start:stop]]
                writer.write(np.arange(start, stop), {layer: block}, np.full(stop - start, STATUS_OK, np.int8))
            writer.finish()
    return path


def _split(n: int) -> list[int]:
    from embedstore.manifest import split_counts
    return list(split_counts(n, FRACTIONS).values())


# ------------------------------------------------------------------------------------- one measurement
def measure(store: Path, out: Path, *, budget: str, epochs: int) -> dict:
    """Runs in a fresh process: one sweep, then its own peak RSS."""
    import torch  # noqa: F401  (imported before the baseline is read, like any sweep)

    from heads.results import read_runs
    from heads.sweep import SweepSettings, run_sweep
    from heads.train import TrainSettings
    from embedstore.streaming import parse_memory_size

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    settings = SweepSettings(strategies=("2B",), fusions=("concat",), seeds=(0,), baselines=False, device="cpu",
                             memory_budget=parse_memory_size(budget),
                             train=TrainSettings(max_epochs=epochs, patience=epochs))
    t0 = time.perf_counter()
    summary = run_sweep(store, out, settings, log=lambda line: print(line, file=sys.stderr))
    wall = time.perf_counter() - t0
    if summary["trained"] != 1:
        raise RuntimeError(f"expected one trained head in {out}, got {summary}; measure into an empty folder")
    row = read_runs(out)[-1]
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "baseline_rss_bytes": baseline, "sweep_wall_s": wall,
            "epoch_s": row["group_seconds"] / row["epochs_run"], "epochs": row["epochs_run"],
            "train_rows": row["store"]["split_rows"]["train"], "data_access": row["store"]["data_access"],
            "test_accuracy": row["test_accuracy"]}


def run_measurement(store: Path, out: Path, *, budget: str, epochs: int) -> dict:
    # under /usr/bin/time: Linux keeps a process's peak RSS across exec, so a child forked straight from this
    # (large) process would start at this process's RSS; time's own child starts small
    command = ["/usr/bin/time", "-f", "time-peak-rss-kib %M", sys.executable, __file__, "--measure", str(store),
               "--measure-out", str(out), "--budget", budget, "--epochs", str(epochs)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(
        Path(__file__).resolve().parents[1])})
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed: {shlex.join(command)}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak = [line for line in done.stderr.splitlines() if line.startswith("time-peak-rss-kib")]
    result["time_peak_rss_bytes"] = int(peak[-1].split()[1]) * 1024
    return result


def _complete(store: Path) -> bool:
    from embedstore.store import FeatureStore
    try:
        with FeatureStore(store) as opened:
            return opened.complete
    except (OSError, ValueError):
        return False


def _available() -> int:
    from embedstore.streaming import available_memory
    return available_memory()


# ----------------------------------------------------------------------------------------------- report
def plot(results: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({(r["classes"], r["dtype"], r["mode"]) for r in results if "epoch_s" in r})
    for classes, dtype, mode in keys:
        points = sorted((r["rows"], r["epoch_s"], max(r["peak_rss_bytes"], r.get("time_peak_rss_bytes", 0)))
                        for r in results
                        if (r["classes"], r["dtype"], r["mode"]) == (classes, dtype, mode) and "epoch_s" in r)
        label = f"{mode}, {dtype}, {classes} classes"
        style = "-" if mode == "streamed" else "--"
        marker = "o" if dtype == "float32" else "s"
        ax_t.plot([p[0] for p in points], [p[1] for p in points], style, marker=marker, label=label)
        ax_m.plot([p[0] for p in points], [p[2] / 2**30 for p in points], style, marker=marker, label=label)
    for ax, title, unit in ((ax_t, "sweep time per epoch (2B-concat, 1 seed)", "seconds"),
                            (ax_m, "peak RSS of the sweep process", "GiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows in the store")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.axhline(2e9 / 2**30, color="grey", lw=0.8, ls=":", label="2 GB target (1M rows, 1 GB budget)")
    ax_m.legend(fontsize=7)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def table(results: list[dict]) -> str:
    """The measurements as a Markdown table (what scale.md shows)."""
    lines = ["| rows | classes | dtype | data | store | budget | epoch s | us/train row | peak RSS | test acc | load |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["classes"], r["rows"], r["dtype"] != "float32", r["mode"])):
        head = (f"| {r['rows']:,} | {r['classes']:,} | {r['dtype']} | {r['mode']} | "
                f"{r['store_bytes'] / 1e9:.2f} GB | ")
        if "skipped" in r:
            lines.append(head + f"- | skipped: {r['skipped']} | | | | | {r['loadavg_before']:.1f} |")
            continue
        peak = max(r["peak_rss_bytes"], r.get("time_peak_rss_bytes", 0))
        lines.append(head + f"{int(r['budget']) / 1e9:.2f} GB | {r['epoch_s']:.1f} | "
                     f"{1e6 * r['epoch_s'] / r['train_rows']:.0f} | {peak / 2**30:.2f} GiB | "
                     f"{r['test_accuracy']:.4f} | {r['loadavg_before']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/scale"), help="folder for the stores and sweep outputs")
    p.add_argument("--rows", default="10000,100000,1000000")
    p.add_argument("--classes", default="37", help="comma-separated class counts")
    p.add_argument("--dtypes", default="float32,float16")
    p.add_argument("--modes", default="memory,streamed")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--stream-budget", default="1GB", help="--memory-budget of the streamed runs")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/scale.json"))
    p.add_argument("--png", type=Path, default=Path("benchmarks/results/scale.png"))
    p.add_argument("--keep-stores", action="store_true")
    p.add_argument("--max-in-memory", default="8GB",
                   help="skip in-memory runs whose matrix x 2.5 exceeds this or the available memory (the machine "
                        "is shared)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from --json and print the table")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--measure-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--budget", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from embedstore.streaming import parse_memory_size

    if args.measure:
        print(json.dumps(measure(args.measure, args.measure_out, budget=args.budget, epochs=args.epochs)))
        return
    if args.plot_only:
        plot(json.loads(args.json.read_text())["results"], args.png)
        print(table(json.loads(args.json.read_text())["results"]))
        return
    command = "python benchmarks/bench_scale.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    previous = json.loads(args.json.read_text()) if args.json.exists() else {"commands": [], "results": []}
    results, commands = previous["results"], previous["commands"] + [command]
    done = {(r["rows"], r["classes"], r["dtype"], r["mode"]) for r in results}
    args.out.mkdir(parents=True, exist_ok=True)
    for classes in [int(c) for c in args.classes.split(",")]:
        for rows in [int(r) for r in args.rows.split(",")]:
            for dtype in args.dtypes.split(","):
                todo = [m for m in args.modes.split(",") if (rows, classes, dtype, m) not in done]
                if not todo:
                    continue
                store = args.out / f"store-{rows}-{classes}-{dtype}.h5"
                t0 = time.perf_counter()
                if store.exists() and not _complete(store):   # an interrupted write: start again
                    store.unlink()
                if not store.exists():
                    write_store(store, rows=rows, classes=classes, dtype=dtype)
                write_s = time.perf_counter() - t0
                matrix = rows * sum(DIMS.values()) * np.dtype(dtype).itemsize
                for mode in todo:
                    entry = {"rows": rows, "classes": classes, "dtype": dtype, "mode": mode,
                             "matrix_bytes": matrix, "store_bytes": store.stat().st_size, "write_s": write_s,
                             "loadavg_before": os.getloadavg()[0]}
                    if mode == "memory":
                        budget = str(4 * matrix + 10**6)   # above the in-memory need: never streams
                        limit = min(_available(), parse_memory_size(args.max_in_memory))
                        if 2.5 * matrix > limit:
                            entry["skipped"] = (f"would need ~{2 * matrix / 1e9:.1f} GB in memory; limit "
                                                f"{limit / 1e9:.1f} GB (--max-in-memory, available memory)")
                            print(entry, flush=True)
                            results.append(entry)
                            continue
                    else:   # below the in-memory need, so that small stores stream too
                        budget = str(min(parse_memory_size(args.stream_budget), matrix - 1))
                    out = args.out / f"sweep-{rows}-{classes}-{dtype}-{mode}"
                    shutil.rmtree(out, ignore_errors=True)   # else the sweep skips the run already there
                    entry.update(run_measurement(store, out, budget=budget, epochs=args.epochs), budget=budget)
                    print(json.dumps(entry), flush=True)
                    results.append(entry)
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"commands": commands, "results": results}, indent=1) + "\n")
                if not args.keep_stores:
                    store.unlink()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"commands": commands, "results": results}, indent=1) + "\n")
    plot(results, args.png)


if __name__ == "__main__":
    main()
