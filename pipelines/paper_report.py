"""The report of `embed paper`: the paper's Tables 3-7, figures, the best model's confusion matrix, the paper's
findings checked on this data, and how this run differs from the paper. Markdown + CSV + PNG in OUT/report/.

It only reads what the steps wrote (OUT/plan.json, modules' metrics.json, sweeps' runs.jsonl) and never trains.
Every mean ± std is over all (manifest seed, seed) runs; the per-manifest columns show the spread over draws.
Strategies and operators are ranked by mean test accuracy (the paper's tables); the best multimodal model is
chosen by validation accuracy, never by test.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from pipelines.paper_targets import ENSEMBLE, choose_multimodal, operator_free, targets, unimodal_heads
from heads.figures import figure_lines, plot_bars
from heads.report import markdown_table
from heads.results import read_runs
from heads.selection import best_summary
from heads.strategies import get_strategy, list_strategies

STRATEGY_NAMES = {1: "S1 (classifier only)", 2: "S2 (middle layer + classifier)", 3: "S3 (fine-tuning)"}
PAPER_BACKBONES = {"image": "resnet50", "text": "bert-base-uncased"}
PAPER_ERROR_RATIOS = {"text": 1 / 2, "image": 1 / 7}  # multimodal error / unimodal error in the paper
RATIO_TOLERANCE = 1.5      # "about": within a factor 1.5 of the paper's ratio
SPEED_RATIO_RANGE = (1.5, 3.0)  # "about twice as fast"
PLAN_FILE = "plan.json"       # what `embed paper` ran (pipelines/paper.py writes it; this report reads it)
REPORT_VERSION = 2         # part of the report step's stamp: a new layout re-renders an existing report


def report_inputs(out: str | Path) -> dict:
    """What the report depends on: the plan and the content of every result file it reads."""
    out = Path(out)
    plan = json.loads((out / PLAN_FILE).read_text())
    files = [Path(m["dir"]) / "metrics.json" for e in plan["manifests"] for m in e["modules"]]
    files += [Path(r["dir"]) / "runs.jsonl" for e in plan["manifests"] for r in e["results"]]
    files += [Path(e["ensembles"]) for e in plan["manifests"] if e.get("ensembles")]
    sha = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None for p in files}
    return {"plan": hashlib.sha256((out / PLAN_FILE).read_bytes()).hexdigest(), "files": sha,
            "report_version": REPORT_VERSION}


# ----------------------------------------------------------------------------------------------- the runs


def collect(plan: dict) -> tuple[list[dict], list[dict]]:
    """(module runs, head runs) as flat rows with their manifest seed; head rows limited to the plan's grid."""
    modules, heads = [], []
    for entry in plan["manifests"]:
        for m in entry["modules"]:
            metrics = json.loads((Path(m["dir"]) / "metrics.json").read_text())
            modules.append({"group": f"{m['modality']} S{m['strategy']}", "modality": m["modality"],
                            "strategy": m["strategy"], "manifest_seed": entry["seed"], "seed": m["seed"],
                            "test_accuracy": metrics["test_accuracy"], "test_macro_f1": metrics["test_macro_f1"],
                            "val_accuracy": metrics["best_val_accuracy"], "train_seconds": metrics["training_seconds"],
                            "epochs": metrics["epochs"], "trainable": metrics["trainable_parameters"],
                            "non_trainable": metrics["non_trainable_parameters"]})
        for r in entry["results"]:
            for row in read_runs(r["dir"]):
                # a sweep dir keeps runs of seeds/operators no longer asked for; report the plan's grid only
                if row["seed"] not in r["seeds"] or (row["fusion"] and row["fusion"] not in r["fusions"]):
                    continue
                heads.append({"group": row["cell"], "strategy": row["strategy"], "fusion": row["fusion"],
                              "manifest_seed": entry["seed"], "seed": row["seed"], "results_dir": r["dir"],
                              "test_accuracy": row["test_accuracy"], "test_macro_f1": row["test_macro_f1"],
                              "val_accuracy": row["best_val_accuracy"], "train_seconds": row["train_seconds"],
                              "epochs": row["epochs_run"], "trainable": row["trainable_parameters"],
                              "non_trainable": row["non_trainable_parameters"]})
        if entry.get("ensembles") and Path(entry["ensembles"]).exists():
            rows = read_runs(Path(entry["ensembles"]).parent, Path(entry["ensembles"]).name)
            if rows:  # the newest: the ensemble over the runs as they are now
                row = rows[-1]
                heads.append({"group": "ensemble", "strategy": "ensemble", "fusion": None,
                              "manifest_seed": entry["seed"], "seed": None, "results_dir": None,
                              "test_accuracy": row["test_accuracy"], "test_macro_f1": row["test_macro_f1"],
                              "val_accuracy": row["val_accuracy"], "train_seconds": row["seconds"], "epochs": None,
                              "trainable": 0, "non_trainable": 0})
    return modules, heads


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(rows: list[dict], name: str) -> dict:
    """Mean and std over every run, and per manifest seed."""
    def stat(key):  # None: not applicable (a regression has no epochs)
        values = [r[key] for r in rows if r[key] is not None]
        return (float(np.mean(values)), _std(values)) if values else (float("nan"), 0.0)

    per_manifest, per_manifest_val = {}, {}
    for m in sorted({r["manifest_seed"] for r in rows}):
        acc = [r["test_accuracy"] for r in rows if r["manifest_seed"] == m]
        per_manifest[m] = (float(np.mean(acc)), _std(acc), len(acc))
        per_manifest_val[m] = float(np.mean([r["val_accuracy"] for r in rows if r["manifest_seed"] == m]))
    (acc, acc_std), (f1, f1_std), (secs, secs_std) = stat("test_accuracy"), stat("test_macro_f1"), stat("train_seconds")
    return {"cell": name, "runs": len(rows), "accuracy_mean": acc, "accuracy_std": acc_std, "macro_f1_mean": f1,
            "macro_f1_std": f1_std, "train_seconds_mean": secs, "train_seconds_std": secs_std,
            "val_accuracy_mean": stat("val_accuracy")[0], "epochs_mean": stat("epochs")[0],
            "trainable": rows[0]["trainable"], "non_trainable": rows[0]["non_trainable"], "per_manifest": per_manifest,
            "per_manifest_val": per_manifest_val, "strategy": rows[0].get("strategy")}


def _groups(rows: list[dict]) -> dict[str, dict]:
    names = list(dict.fromkeys(r["group"] for r in rows))
    return {n: summarize([r for r in rows if r["group"] == n], n) for n in names}


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _seconds(mean: float, std: float) -> str:
    digits = 1 if mean >= 10 else 3  # heads over cached features train in fractions of a second
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _columns(manifest_seeds: list[int]) -> list[str]:
    return (["runs", "accuracy %", "macro-F1 %", "training time (s)", "epochs", "trainable params",
             "non-trainable params"] + [f"accuracy % manifest {m}" for m in manifest_seeds])


def _cells(c: dict | None, manifest_seeds: list[int]) -> list:
    if c is None:
        return [""] * len(_columns(manifest_seeds))
    return ([c["runs"], _pm(c["accuracy_mean"], c["accuracy_std"]), _pm(c["macro_f1_mean"], c["macro_f1_std"]),
             _seconds(c["train_seconds_mean"], c["train_seconds_std"]),
             "" if np.isnan(c["epochs_mean"]) else f"{c['epochs_mean']:.1f}",
             f"{c['trainable']:,}", f"{c['non_trainable']:,}"]
            + [_pm(*c["per_manifest"][m][:2]) if m in c["per_manifest"] else "" for m in manifest_seeds])


# ----------------------------------------------------------------------------------------------- tables


def build_tables(plan: dict, modules: dict, heads: dict) -> dict[str, tuple[str, list[str], list[list]]]:
    """name -> (title, header, rows)."""
    ms = [e["seed"] for e in plan["manifests"]]
    settings, tables = plan["settings"], {}
    for number, modality in ((3, "image"), (4, "text")):
        rows = []
        for strategy in (1, 2, 3):
            c = modules.get(f"{modality} S{strategy}")
            rows.append([STRATEGY_NAMES[strategy]] + (_cells(c, ms) if c else
                                                      ["not run (--no-image-s3)"] + _cells(None, ms)[1:]))
        tables[f"table{number}_{modality}_strategies"] = (
            f"Table {number}: {modality} transfer strategies ({settings[f'{modality}_backbone']})",
            ["strategy"] + _columns(ms), rows)

    fused, cached = _fused(), _cached()
    fusions = [f for f in settings["fusions"] if any(f"{s}-{f}" in heads for s in fused)]
    fusions += [f for f in settings["end_to_end_fusions"] if f not in fusions and settings["end_to_end"]]
    strategies = [s for s in fused if any(k.startswith(f"{s}-") for k in heads)]
    rows = []
    for s in strategies:   # the best operator by validation (heads/selection.py), as every report chooses
        best = best_summary(c for k, c in heads.items() if k.startswith(f"{s}-"))
        per_fusion = [_pm(heads[f"{s}-{f}"]["accuracy_mean"], heads[f"{s}-{f}"]["accuracy_std"])
                      if f"{s}-{f}" in heads else "" for f in fusions]
        rows.append([s, best["cell"].split("-", 1)[1]] + _cells(best, ms) + per_fusion)
    for name in operator_free():  # late fusion, stacking, ensembles, linear: one row each, no operator
        if name in heads:
            rows.append([name, "(none)"] + _cells(heads[name], ms) + [""] * len(fusions))
    tables["table5_multimodal_strategies"] = (
        "Table 5: multimodal fine-tuning strategies (the best operator of each by validation; accuracy per operator "
        "at the right)",
        ["strategy", "best fusion"] + _columns(ms) + [f"{f} acc %" for f in fusions], rows)

    rows = []
    for f in fusions:
        of_cached = [heads[f"{s}-{f}"] for s in cached if f"{s}-{f}" in heads]
        rows.append([f] + [_pm(heads[f"{s}-{f}"]["accuracy_mean"], heads[f"{s}-{f}"]["accuracy_std"])
                           if f"{s}-{f}" in heads else "" for s in strategies]
                    + ([f"{100 * np.mean([c['accuracy_mean'] for c in of_cached]):.2f}",
                        f"{100 * np.mean([c['macro_f1_mean'] for c in of_cached]):.2f}",
                        f"{np.mean([c['train_seconds_mean'] for c in of_cached]):.3f}"] if of_cached else ["", "", ""]))
    tables["table6_fusion_operators"] = (
        f"Table 6: fusion operators (mean over the cached strategies {', '.join(cached)} at the right)",
        ["fusion"] + [f"{s} acc %" for s in strategies] + ["mean acc %", "mean macro-F1 %", "mean train s/head"],
        rows)

    rows = []
    for label, c in unimodal_vs_multimodal(modules, heads, ms[0] if ms else None):
        rows.append([label, f"{100 * (1 - c['accuracy_mean']):.2f}"] + _cells(c, ms))
    tables["table7_unimodal_vs_multimodal"] = ("Table 7: unimodal vs multimodal", ["model", "error %"] + _columns(ms),
                                               rows)
    return tables


def _fused() -> tuple[str, ...]:
    """Multimodal strategies with a fusion operator, cached and end to end (heads/strategies.py)."""
    return list_strategies(fused=True)


def _cached() -> tuple[str, ...]:
    """The fused strategies trained over the store."""
    return tuple(s for s in _fused() if get_strategy(s).over_store)


def best_module(modules: dict, modality: str) -> dict | None:
    mine = [c for k, c in modules.items() if k.startswith(f"{modality} S")]
    return max(mine, key=lambda c: c["accuracy_mean"]) if mine else None


def best_multimodal(heads: dict, cached_only: bool = False, choice_manifest: int | None = None) -> dict | None:
    """The best multimodal model by validation accuracy on the choice manifest (pipelines/paper_targets.py);
    `cached_only`: among the fusion heads over the store (1-A, 1-B, 2-A, 2-B) only."""
    pool = [c for k, c in heads.items() if k.split("-")[0] in _cached()] if cached_only else None
    return choose_multimodal(heads, choice_manifest, pool=pool)


ENSEMBLE_LABEL = "top-k heads by validation, probabilities averaged"


def _label(name: str) -> str:
    return ENSEMBLE_LABEL if name == ENSEMBLE else get_strategy(name).label


def unimodal_vs_multimodal(modules: dict, heads: dict, choice_manifest: int | None = None) -> list[tuple[str, dict]]:
    picks = []
    for modality in ("image", "text"):
        if (c := best_module(modules, modality)) is not None:
            picks.append((f"{modality} only: best module ({c['cell']})", c))
    for name, modality in unimodal_heads().items():
        if name in heads:
            picks.append((f"{modality} only: {_label(name)} ({name})", heads[name]))
    for name in operator_free():
        if name in heads:
            picks.append((f"multimodal: {_label(name)} ({name})", heads[name]))
    if (c := best_multimodal(heads, choice_manifest=choice_manifest)) is not None:
        where = f" on manifest {choice_manifest}" if choice_manifest is not None else ""
        picks.append((f"multimodal: best by validation{where} ({c['cell']})", c))
    return picks


# ----------------------------------------------------------------------------------------------- findings


def _verdict(held: bool | None) -> str:
    return "NOT DECIDED" if held is None else "HELD" if held else "NOT HELD"


def findings(modules: dict, heads: dict, choice_manifest: int | None = None) -> list[tuple[str, str, str]]:
    """(the paper's claim, HELD / NOT HELD, the numbers that decide it)."""
    out = []

    def acc(c):
        return f"{c['cell']} {100 * c['accuracy_mean']:.2f} %"

    for modality, winner in (("image", 2), ("text", 3)):
        mine = [c for k, c in modules.items() if k.startswith(f"{modality} S")]
        best = best_module(modules, modality)
        ran = ", ".join(acc(c) for c in mine)
        missing = [s for s in (1, 2, 3) if f"{modality} S{s}" not in modules]
        note = f" (S{', S'.join(map(str, missing))} not run)" if missing else ""
        out.append((f"{modality} S{winner} is the best {modality} strategy",
                    _verdict(best is not None and best["cell"] == f"{modality} S{winner}"),
                    f"mean test accuracy: {ran}{note}"))

    strategy_best = {}
    for s in _fused():
        mine = [c for k, c in heads.items() if k.startswith(f"{s}-")]
        if mine:
            strategy_best[s] = max(mine, key=lambda c: c["accuracy_mean"])
    top = max(strategy_best.values(), key=lambda c: c["accuracy_mean"]) if strategy_best else None
    out.append(("1-A is the best multimodal strategy",
                _verdict(None if top is None else top["cell"].startswith("1A-")),
                "best operator of each strategy: " + ", ".join(acc(c) for c in strategy_best.values())))
    t = {s: np.mean([c["train_seconds_mean"] for k, c in heads.items() if k.startswith(f"{s}-")])
         for s in ("1A", "1B") if any(k.startswith(f"{s}-") for k in heads)}
    ratio = t["1B"] / t["1A"] if len(t) == 2 and t["1A"] > 0 else None
    low, high = SPEED_RATIO_RANGE
    out.append(("1-A trains about twice as fast as 1-B",
                _verdict(None if ratio is None else low <= ratio <= high),
                "not measured" if ratio is None else
                f"mean training time per head over all operators: 1-A {t['1A']:.3f} s, 1-B {t['1B']:.3f} s; "
                f"1-B / 1-A = {ratio:.2f} (HELD when {low} <= ratio <= {high})"))

    per_fusion = {}
    for k, c in heads.items():
        if k.split("-")[0] in _cached():
            per_fusion.setdefault(k.split("-", 1)[1], []).append(c["accuracy_mean"])
    means = {f: float(np.mean(v)) for f, v in per_fusion.items()}
    winner = max(means, key=means.get) if means else None
    out.append(("concatenation is the best fusion operator", _verdict(None if winner is None else winner == "concat"),
                "mean test accuracy over 1-A, 1-B, 2-A, 2-B: " +
                ", ".join(f"{f} {100 * v:.2f} %" for f, v in sorted(means.items(), key=lambda x: -x[1]))))

    multi = best_multimodal(heads, choice_manifest=choice_manifest)
    for modality, label in (("text", "half"), ("image", "a seventh")):
        uni = best_module(modules, modality)
        target = PAPER_ERROR_RATIOS[modality]
        if multi is None or uni is None or uni["accuracy_mean"] >= 1:
            out.append((f"multimodal error is about {label} of {modality}-only's", _verdict(None), "not measured"))
            continue
        e_multi, e_uni = 1 - multi["accuracy_mean"], 1 - uni["accuracy_mean"]
        r = e_multi / e_uni
        out.append((f"multimodal error is about {label} of {modality}-only's",
                    _verdict(target / RATIO_TOLERANCE <= r <= target * RATIO_TOLERANCE),
                    f"error {100 * e_multi:.2f} % ({multi['cell']}) / {100 * e_uni:.2f} % ({uni['cell']}) = {r:.3f}; "
                    f"paper {target:.3f}; HELD within a factor {RATIO_TOLERANCE} of it"))
    return out


# ----------------------------------------------------------------------------------------------- confusion


def confusion(heads_rows: list[dict], best: dict, report_dir: Path) -> tuple[list[str], list[Path]]:
    """Confusion matrix of the best cached multimodal cell's best saved head (by validation accuracy) on its
    store's test items: PNG + CSV, and the 10 most confused class pairs as Markdown lines (paths in them are
    relative to the report's folder: a report names no machine's folders)."""
    from sklearn.metrics import confusion_matrix

    from embedstore.outputs import open_atomic, relative_to_folder

    from embedstore.store import FeatureStore
    from heads.estimator import FusionHead

    dirs = sorted({r["results_dir"] for r in heads_rows if r["group"] == best["cell"]})
    saved = [Path(d) / "heads" / best["cell"] for d in dirs]
    saved = [d for d in saved if (d / "config.json").exists()]
    if not saved:
        return [f"No saved head of {best['cell']}; no confusion matrix."], []
    head_dir = max(saved, key=lambda d: json.loads((d / "config.json").read_text())["best_val_accuracy"])
    head = FusionHead.from_pretrained(head_dir)
    from heads.saved import head_store_path
    with FeatureStore(head_store_path(head_dir, head.metadata_)) as store:
        data = store.load(head.metadata_["inputs"])
        classes = list(store.classes)
    test = data.split == "test"
    predicted = head.predict([data.features[n][test] for n in head.metadata_["inputs"]])
    matrix = confusion_matrix(np.asarray(classes)[data.labels[test]], predicted, labels=classes)  # class names
    csv_path, png_path = report_dir / "confusion_matrix.csv", report_dir / "confusion_matrix.png"
    with open_atomic(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([["true \\ predicted"] + classes] + [[c] + list(r) for c, r in zip(classes, matrix)])
    where = f"{head_dir.parents[3].name}, {head_dir.parents[1].name}, seed {head.seed}"  # OUT/<m>/results/<r>/heads
    _plot_confusion(matrix, classes, png_path, f"{best['cell']} ({where}): test accuracy "
                                               f"{np.trace(matrix) / matrix.sum():.4f}")
    off = [(int(matrix[i, j]), classes[i], classes[j]) for i in range(len(classes)) for j in range(len(classes))
           if i != j and matrix[i, j]]
    pairs = sorted(off, key=lambda x: (-x[0], x[1], x[2]))[:10]
    lines = [f"Best fusion head (1-A, 1-B, 2-A, 2-B: the models with a saved head to score) by validation "
             f"accuracy: **{best['cell']}**, saved head `{relative_to_folder(head_dir, report_dir)}` (seed "
             f"{head.seed}, validation accuracy {head.metadata_['best_val_accuracy']:.4f}), on the "
             f"{int(test.sum())} test items of its store."
             + (f" The {len(pairs)} most confused pairs (true -> predicted):" if pairs else ""), ""]
    lines.append(markdown_table(["true", "predicted", "count"], [[t, p, n] for n, t, p in pairs]) if pairs
                 else "No test item was misclassified.")
    return lines, [csv_path, png_path]


def _plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    from embedstore.outputs import partial_file

    size = max(5.0, 0.28 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    # a power scale, so that the few errors of a good model are visible beside the full diagonal
    image = ax.imshow(matrix, cmap="Blues", norm=PowerNorm(0.4, vmin=0, vmax=max(1, matrix.max())))
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="test items (power scale)")
    for i, j in zip(*np.nonzero(matrix)):   # every count written, errors in red
        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=5.5,
                color="white" if i == j and matrix[i, j] > 0.5 * matrix.max() else "#b00000" if i != j else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
    ax.set_yticks(range(len(classes)), classes, fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: {title}\n(counts in the cells; off-diagonal counts in red are errors)",
                 fontsize=8)
    fig.tight_layout()
    with partial_file(path) as partial:
        fig.savefig(partial, dpi=120, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- the report


def differences(plan: dict, modules: dict) -> list[str]:
    from embedstore.store import FeatureStore

    s, lines = plan["settings"], []
    with FeatureStore(plan["manifests"][0]["store"]) as store:
        for modality in ("image", "text"):
            p = store.feature_sets[store.find(modality, "pooled")].provenance
            size = f" at {p['preprocessing']['image_size']} px" if modality == "image" else ""
            same = "as in the paper" if p["backbone"] == PAPER_BACKBONES[modality] else \
                f"the paper used {PAPER_BACKBONES[modality]}"
            lines.append(f"- {modality} backbone: **{p['backbone']}**{size}, weights `{p['weights_id']}` ({same}).")
    photos = plan.get("catalog_images", {})
    sizes = ", ".join(f"{k} px ({n})" for k, n in sorted(photos.get("sizes", {}).items(), key=lambda x: -x[1]))
    lines.append(f"- Catalog photos (width x height, count in a sample of {photos.get('sampled', 0)}): "
                 f"{sizes or 'none readable'}; the protocol resizes them to {round(s['image_size'] * 256 / 224)} and "
                 f"center-crops {s['image_size']} px, so small photos are upscaled.")
    image_s3 = modules.get("image S3")
    if not s["image_s3"]:
        lines.append("- Image S3: skipped (--no-image-s3; an epoch takes about 6-8 min on 2 idle CPU cores, and it needs tens of epochs).")
    elif image_s3:
        lines.append(f"- Image S3: {len(s['image_s3_seeds'])} seed(s), at most {s['image_s3_epochs']} epochs "
                     f"(mean {image_s3['epochs_mean']:.1f} run).")
    text_s3 = modules.get("text S3")
    if text_s3:
        lines.append(f"- Text S3 training reduced: {len(s['text_s3_seeds'])} seed(s) (S1/S2 and heads: "
                     f"{len(s['seeds'])}), at most {s['text_s3_epochs']} epochs (mean {text_s3['epochs_mean']:.1f} "
                     "run, early stopping on validation accuracy).")
    image_pair, text_pair = s["pair"]
    lines.append(f"- 1-A/1-B fuse image S{image_pair} + text S{text_pair} modules; head seed s uses the modules of "
                 f"seed s where one was trained, else the first seed's (S3 trains fewer seeds).")
    lines.append("- 3-A/3-B (end to end): " + (f"run with {', '.join(s['end_to_end_fusions'])}, at most "
                                               f"{s['end_to_end_epochs']} epochs" if s["end_to_end"]
                                               else "skipped (--no-end-to-end)") + ".")
    lines.append(f"- Spread: {len(plan['manifests'])} manifests (draws of the catalog) x seeds {s['seeds']}.")
    return lines


def write_paper_report(out: str | Path, report_dir: str | Path) -> list[Path]:
    """Write report.md, one CSV per table, bar charts and the confusion matrix; returns the paths written."""
    from embedstore.outputs import open_atomic, write_text_atomic

    out, report_dir = Path(out), Path(report_dir)
    plan = json.loads((out / PLAN_FILE).read_text())
    module_rows, head_rows = collect(plan)
    if not head_rows:
        raise FileNotFoundError(f"no head runs under {out}; run `embed paper CATALOG --out {out}` first")
    report_dir.mkdir(parents=True, exist_ok=True)
    modules, heads = _groups(module_rows), _groups(head_rows)
    written = []
    md = ["# The 14-strategy comparison of Seo, Lee & Jang (2025) on this catalog", "",
          f"Catalog `{Path(plan['catalog']).name}`; manifests {', '.join(str(e['seed']) for e in plan['manifests'])}; seeds "
          f"{plan['settings']['seeds']}. Accuracy and macro-F1 on the test split at the best validation epoch, mean ± "
          "std over all (manifest seed, seed) runs; the per-manifest columns are mean ± std over that manifest's "
          "seeds. Training time is per model (a head's share of its batched stack)."]
    for name, (title, header, rows) in build_tables(plan, modules, heads).items():
        path = report_dir / f"{name}.csv"
        with open_atomic(path, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
        written.append(path)
        md += ["", f"## {title}", "", markdown_table(header, rows)]
    md += ["", "## Findings of the paper, checked", ""]
    choice = plan["manifests"][0]["seed"]  # models are chosen on this manifest's validation split only
    md += [f"- **{verdict}**: {claim}. {evidence}." for claim, verdict, evidence in findings(modules, heads, choice)]
    md += ["", "## Targets for the fused model", "",
           f"Choices were made on manifest {choice} only: the multimodal model below is the one with the best "
           f"validation accuracy on manifest {choice}, and it is scored on every manifest's test split. Test "
           "accuracy chose nothing.", ""]
    md += [f"- **{verdict}**: {target}. {evidence}." for target, verdict, evidence
           in targets(modules, heads, [e["seed"] for e in plan["manifests"]], choice)]
    md += ["", "## Confusion matrix of the best model", ""]
    best = best_multimodal(heads, cached_only=True, choice_manifest=choice)
    lines, paths = confusion(head_rows, best, report_dir) if best else (["No multimodal heads."], [])
    md += lines + ["", "![confusion matrix of the best fusion head](confusion_matrix.png)"] * bool(paths)
    written += paths
    md += ["", "## Differences from the paper", ""] + differences(plan, modules)
    spread = "± 1 sample std over all (manifest seed, seed) runs"
    figures = plot_bars(list(heads.values()), report_dir, prefix="heads_",
                        title="Fusion heads, decision-level models, baselines", spread=spread)
    figures += plot_bars(list(modules.values()), report_dir, prefix="modules_", title="Unimodal modules (S1-S3)",
                         spread=spread)
    written += figures
    md += ["", "## Figures", ""] + figure_lines(figures, spread)
    write_text_atomic(report_dir / "report.md", "\n".join(md) + "\n")
    return written + [report_dir / "report.md"]
