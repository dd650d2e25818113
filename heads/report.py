"""`heads report`: render RESULTS/runs.jsonl as the paper's Tables 5-7 (Markdown + CSV) and bar charts.

The report only reads result rows; it never trains. Mean and spread (sample std) are over seeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from heads.fusion import list_fusions
from embedstore.fingerprint import fingerprint
from heads.results import read_runs, runs_path
from heads.figures import figure_lines, plot_bars
from heads.selection import TIE_RULE, best_summary
from heads.strategies import get_strategy, is_multimodal, list_strategies, report_order
from heads.tables import (MEAN_HEADER, Table, accuracy_pm, macro_f1_pm, markdown_table, mean_columns, mean_std,
                          one_decimal, percent, pm, write_tables)


def _multimodal(cells: list[dict]) -> list[dict]:
    """Every strategy that reads both modalities: candidates for "the best multimodal model" (by validation)."""
    return [c for c in cells if is_multimodal(c["strategy"])]


def _reference(strategy: str) -> bool:
    """Table 7's simple reference models: the unimodal heads and the regressions (strategies.py `reference`)."""
    return strategy in list_strategies() and get_strategy(strategy).reference


def _table5(strategy: str) -> bool:
    """Table 5's rows: the multimodal strategies that are not simple reference models."""
    return is_multimodal(strategy) and not _reference(strategy)


def unique_runs(rows: list[dict]) -> tuple[list[dict], int]:
    """One row per run_key (the first), and how many repeats were left out: a run counted twice would shrink
    the spread over seeds and weigh its seed double."""
    seen, unique = set(), []
    for row in rows:
        if row["run_key"] not in seen:
            seen.add(row["run_key"])
            unique.append(row)
    return unique, len(rows) - len(unique)


def _variant(row: dict) -> str:
    doc = {"config": row["config"], "train": row["train_settings"], "store": row["store"]["manifest_sha256"]}
    return fingerprint(doc)[:8]


def summarize(rows: list[dict]) -> list[dict]:
    """One summary per cell (and per settings variant, when RESULTS holds more than one)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    diverged: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["cell"], _variant(row))
        if row.get("diverged"):   # counted in the cell's note, never averaged in
            diverged[key] = diverged.get(key, 0) + 1
            continue
        groups.setdefault(key, []).append(row)
    several = {cell for cell, _ in groups if sum(c == cell for c, _ in groups) > 1}
    out = []
    for (cell, variant), rs in groups.items():
        (acc, acc_std), (f1, f1_std), (secs, secs_std) = (
            mean_std([r[key] for r in rs]) for key in ("test_accuracy", "test_macro_f1", "train_seconds"))
        notes = sorted({r["non_trainable_note"] for r in rs if r.get("non_trainable_note")})
        if diverged.get((cell, variant)):
            notes.append(f"{diverged[cell, variant]} more seed(s) diverged (non-finite loss) and are left out")
        out.append({
            "cell": cell if cell not in several else f"{cell} [{variant}]", "strategy": rs[0]["strategy"],
            "pair": rs[0].get("pair", ""),
            "fusion": rs[0]["fusion"] or "", "seeds": len(rs),
            "accuracy_mean": acc, "accuracy_std": acc_std, "macro_f1_mean": f1, "macro_f1_std": f1_std,
            "best_epoch_mean": _mean_or_nan([r["best_epoch"] for r in rs]),   # NaN: no epochs (decision models)
            "epochs_mean": _mean_or_nan([r["epochs_run"] for r in rs]),
            "val_accuracy_mean": float(np.mean([r["best_val_accuracy"] for r in rs])),
            "train_seconds_mean": secs, "train_seconds_std": secs_std,
            "trainable_parameters": rs[0]["trainable_parameters"],
            "non_trainable_parameters": rs[0]["non_trainable_parameters"],
            "note": "; ".join(notes),
        })
    order = {s: i for i, s in enumerate(report_order())}
    return sorted(out, key=lambda c: (order.get(c["strategy"], 99), c["fusion"], c["cell"]))


def _mean_or_nan(values: list) -> float:
    return float(np.mean(values)) if all(v is not None for v in values) else float("nan")


def _best_pair(cells: list[dict]) -> str | None:
    """With several backbone pairs, Tables 5-6 show the pair of the best multimodal cell by validation
    (heads/selection.py); the by-pair table compares them all."""
    multi = _multimodal(cells)
    if len({c["pair"] for c in multi}) <= 1:
        return None
    return best_summary(multi)["pair"]


def _pair_table(cells: list[dict]) -> Table:
    """One row per (image source, text source) pair: each strategy's best operator, and the best of all (by
    validation)."""
    multi = _multimodal(cells)
    strategies = [s for s in report_order() if any(c["strategy"] == s for c in multi)]
    rows = []
    for pair in sorted({c["pair"] for c in multi}):
        mine = [c for c in multi if c["pair"] == pair]
        row = [pair]
        for s in strategies:
            of_s = [c for c in mine if c["strategy"] == s]
            best = best_summary(of_s)
            row.append(f"{accuracy_pm(best)} ({best['fusion'] or '-'})" if best else "")
        top = best_summary(mine)
        rows.append(row + [_base(top), accuracy_pm(top)])
    for c in (c for c in cells if _reference(c["strategy"]) and not is_multimodal(c["strategy"])):
        rows.append([f"{c['strategy']} only: {c['pair']}"] + [""] * len(strategies) +
                    ["", accuracy_pm(c)])
    return Table("By backbone pair (test accuracy, mean ± std over seeds; Tables 5-6 show the best pair)",
                 ["backbone pair"] + [f"{s} best-by-val acc % (operator)" for s in strategies] +
                 ["best cell by val", "its acc %"], rows)


def _base(cell: dict) -> str:
    return cell["strategy"] if not cell["fusion"] else f"{cell['strategy']}-{cell['fusion']}"


def _tables(cells: list[dict]) -> dict[str, Table]:
    pair = _best_pair(cells)
    tables = {"by_pair": _pair_table(cells)} if pair is not None else {}
    multi = [c for c in _multimodal(cells) if pair is None or c["pair"] == pair]
    present = {c["fusion"] for c in multi if c["fusion"]}
    fusions = [f for f in list_fusions() if f in present] + sorted(present - set(list_fusions()))
    strategies = [s for s in report_order() if _table5(s) and any(c["strategy"] == s for c in multi)]
    by = {(c["strategy"], c["fusion"]): c for c in multi}

    header = ["cell", "seeds", "accuracy %", "macro-F1 %", "best epoch", "epochs", "train s/head",
              "trainable params", "non-trainable params", "note"]
    tables["cells"] = Table("All cells", header, [
        [c["cell"], c["seeds"], accuracy_pm(c), macro_f1_pm(c), one_decimal(c["best_epoch_mean"]),
         one_decimal(c["epochs_mean"]), pm(c["train_seconds_mean"], c["train_seconds_std"], 1),
         c["trainable_parameters"], c["non_trainable_parameters"], c["note"]] for c in cells])

    # Table 5: multimodal strategies, accuracy per operator and the best operator by validation; strategies
    # without an operator (LF, ST, ...) name how they fuse (strategies.py `fused_by`)
    rows = []
    for s in strategies:
        best = best_summary(c for c in multi if c["strategy"] == s)
        rows.append([s] + [accuracy_pm(by[s, f]) if (s, f) in by else "" for f in fusions]
                    + [best["fusion"] or get_strategy(s).fused_by or "", accuracy_pm(best), macro_f1_pm(best),
                       f"{best['train_seconds_mean']:.2f}", best["trainable_parameters"],
                       best["non_trainable_parameters"]])
    tables["table5_strategies"] = Table(
        "Table 5: multimodal fine-tuning strategies (test accuracy, mean ± std over seeds)",
        ["strategy"] + [f"{f} acc %" for f in fusions] + ["best fusion (by val)", "its acc %", "its macro-F1 %",
                                                          "train s/head", "trainable params", "non-trainable params"],
        rows)

    # Table 6: fusion operators, per strategy and on average over strategies
    rows = []
    strategies6 = [s for s in strategies if get_strategy(s).fused]   # the ones with an operator
    for f in fusions:
        mine = [by[s, f] for s in strategies6 if (s, f) in by]
        rows.append([f] + [accuracy_pm(by[s, f]) if (s, f) in by else "" for s in strategies6] + mean_columns(mine))
    tables["table6_fusions"] = Table("Table 6: fusion operators (test accuracy, mean ± std over seeds)",
                                     ["fusion"] + [f"{s} acc %" for s in strategies6] + MEAN_HEADER, rows)

    # Table 7: the simple reference models (unimodal heads, regressions) vs the best multimodal model, chosen by
    # mean validation accuracy (never by test) among every multimodal cell
    rows = []
    references = [c for c in cells if _reference(c["strategy"])]
    # the heads first (their names say what they are), then the regressions with their labels
    picks = ([c for c in references if get_strategy(c["strategy"]).trainer == "head"] +
             [c for c in references if get_strategy(c["strategy"]).trainer != "head"])
    if multi:
        picks.append(best_summary(multi))
    for i, c in enumerate(picks):
        declared = get_strategy(c["strategy"])
        kind = (f"multimodal (best by validation: {c['cell']})" if multi and i == len(picks) - 1 else
                f"{c['strategy']} only" if declared.trainer == "head" else f"{declared.label} ({c['cell']})")
        rows.append([kind, accuracy_pm(c), macro_f1_pm(c), f"{c['train_seconds_mean']:.2f}",
                     c["trainable_parameters"], c["non_trainable_parameters"]])
    tables["table7_unimodal_vs_multimodal"] = Table("Table 7: unimodal vs multimodal",
                                                    ["model", "accuracy %", "macro-F1 %", "train s/head",
                                                     "trainable params", "non-trainable params"], rows)
    return tables


def write_report(results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write report.md (linking the figures), one CSV per table, accuracy.png and training_time.png; returns the
    paths written."""
    from embedstore.outputs import check_writable, relative_to_folder, write_text_atomic

    rows, repeats = unique_runs(read_runs(results_dir))
    if not rows:
        raise FileNotFoundError(f"no runs in {runs_path(results_dir)}; run `heads sweep STORE --out "
                                f"{results_dir}` first")
    out_dir = Path(out_dir)
    check_writable(out_dir, folder=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = summarize(rows)
    tables = _tables(cells)
    stores = sorted({r["store"]["manifest_sha256"] for r in rows})
    # paths relative to the report's folder: the report names no machine's folders
    md = [f"# Fusion head sweep: {len(rows)} runs from {relative_to_folder(runs_path(results_dir), out_dir)}",
          f"Store manifest(s): {', '.join(stores)}. Accuracy and macro-F1 on the test split at each head's best "
          f"validation epoch; train s/head is wall time per head (batched stacks share theirs). Every \"best\" is "
          f"chosen on validation, never on test ({TIE_RULE})."]
    if repeats:
        md.append(f"{repeats} repeated rows (a run_key already seen) were left out.")
    table_lines, written = write_tables(tables, out_dir)
    md += table_lines
    md += ensemble_section(results_dir)
    figures = plot_bars(cells, out_dir)
    md += ["", "## Figures", ""] + figure_lines(figures)
    write_text_atomic(out_dir / "report.md", "\n".join(md) + "\n")
    written.append(out_dir / "report.md")
    return written + figures


def ensemble_section(results_dir: str | Path) -> list[str]:
    """Markdown lines for RESULTS/ensembles.jsonl (`heads ensemble`): one row per ensemble recorded, beside the
    best single head by validation on the same items; [] when there is none."""
    from heads.ensemble import ENSEMBLES_FILE

    rows, _ = unique_runs(read_runs(results_dir, ENSEMBLES_FILE))
    if not rows:
        return []
    header = ["model", "k (asked)", "members", "val acc %", "test acc %", "test macro-F1 %",
              "best single by val: test acc %", "val / test items (left out)"]
    body = []
    for row in rows:
        items, single = row["items"], row["best_single"]
        pool = "multimodal heads" if row["multimodal_only"] else "multimodal heads + baselines"
        body.append([f"ensemble of top-k by validation ({pool})",
                     f"{row['k']} ({row['top_k']})", ", ".join(row["members"]), percent(row["val_accuracy"]),
                     percent(row["test_accuracy"]), percent(row["test_macro_f1"]),
                     f"{percent(single['test_accuracy'])} ({single['member']})",
                     f"{items['val']['scored']} / {items['test']['scored']} ({items['val']['left_out']} / "
                     f"{items['test']['left_out']})"])
    return ["", "## Ensembles: average probabilities of the top-k saved heads by recorded validation accuracy", "",
            f"From {ENSEMBLES_FILE}; members are head folders relative to the results folder; k chosen on "
            "validation when asked auto; scored on the items every member scores.", "",
            markdown_table(header, body)]
