"""The tables of `embed paper`'s report: the paper's Tables 3-7 over the run's summaries (pipelines/paper_summaries.py),
built with the reports' table blocks (heads/tables.py).

Every mean ± std is over all (manifest seed, seed) runs; the per-manifest columns show the spread over draws.
Strategies and operators are ranked by mean test accuracy (the paper's tables); the best multimodal model is chosen
by validation accuracy, never by test.
"""
from __future__ import annotations

from heads.selection import best_summary
from heads.strategies import get_strategy
from heads.tables import (MEAN_HEADER, Table, accuracy_pm, macro_f1_pm, mean_columns, one_decimal, percent, pm,
                          seconds_pm)
from pipelines.paper_summaries import best_module, best_multimodal, cached_strategies
from pipelines.paper_targets import ENSEMBLE, operator_free, operator_strategies, unimodal_heads

STRATEGY_NAMES = {1: "S1 (classifier only)", 2: "S2 (middle layer + classifier)", 3: "S3 (fine-tuning)"}
ENSEMBLE_LABEL = "top-k heads by validation, probabilities averaged"


def _columns(manifest_seeds: list[int]) -> list[str]:
    return (["runs", "accuracy %", "macro-F1 %", "training time (s)", "epochs", "trainable params",
             "non-trainable params"] + [f"accuracy % manifest {m}" for m in manifest_seeds])


def _cells(c: dict | None, manifest_seeds: list[int]) -> list:
    if c is None:
        return [""] * len(_columns(manifest_seeds))
    return ([c["runs"], accuracy_pm(c), macro_f1_pm(c), seconds_pm(c["train_seconds_mean"], c["train_seconds_std"]),
             one_decimal(c["epochs_mean"]), f"{c['trainable']:,}", f"{c['non_trainable']:,}"]
            + [pm(*c["per_manifest"][m][:2]) if m in c["per_manifest"] else "" for m in manifest_seeds])


def build_tables(plan: dict, modules: dict, heads: dict) -> dict[str, Table]:
    """Tables 3-7 by name (the name of each one's CSV file)."""
    ms = [e["seed"] for e in plan["manifests"]]
    settings, tables = plan["settings"], {}
    for number, modality in ((3, "image"), (4, "text")):
        rows = []
        for strategy in (1, 2, 3):
            c = modules.get(f"{modality} S{strategy}")
            rows.append([STRATEGY_NAMES[strategy]] + (_cells(c, ms) if c else
                                                      ["not run (--no-image-s3)"] + _cells(None, ms)[1:]))
        tables[f"table{number}_{modality}_strategies"] = Table(
            f"Table {number}: {modality} transfer strategies ({settings[f'{modality}_backbone']})",
            ["strategy"] + _columns(ms), rows)

    fused, cached = operator_strategies(), cached_strategies()
    fusions = [f for f in settings["fusions"] if any(f"{s}-{f}" in heads for s in fused)]
    fusions += [f for f in settings["end_to_end_fusions"] if f not in fusions and settings["end_to_end"]]
    strategies = [s for s in fused if any(k.startswith(f"{s}-") for k in heads)]
    rows = []
    for s in strategies:   # the best operator by validation (heads/selection.py), as every report chooses
        best = best_summary(c for k, c in heads.items() if k.startswith(f"{s}-"))
        per_fusion = [accuracy_pm(heads[f"{s}-{f}"]) if f"{s}-{f}" in heads else "" for f in fusions]
        rows.append([s, best["cell"].split("-", 1)[1]] + _cells(best, ms) + per_fusion)
    for name in operator_free():  # late fusion, stacking, ensembles, linear: one row each, no operator
        if name in heads:
            rows.append([name, "(none)"] + _cells(heads[name], ms) + [""] * len(fusions))
    tables["table5_multimodal_strategies"] = Table(
        "Table 5: multimodal fine-tuning strategies (the best operator of each by validation; accuracy per operator "
        "at the right)",
        ["strategy", "best fusion"] + _columns(ms) + [f"{f} acc %" for f in fusions], rows)

    rows = []
    for f in fusions:
        of_cached = [heads[f"{s}-{f}"] for s in cached if f"{s}-{f}" in heads]
        rows.append([f] + [accuracy_pm(heads[f"{s}-{f}"]) if f"{s}-{f}" in heads else "" for s in strategies]
                    + (mean_columns(of_cached, seconds_digits=3) if of_cached else ["", "", ""]))
    tables["table6_fusion_operators"] = Table(
        f"Table 6: fusion operators (mean over the cached strategies {', '.join(cached)} at the right)",
        ["fusion"] + [f"{s} acc %" for s in strategies] + MEAN_HEADER, rows)

    rows = []
    for label, c in unimodal_vs_multimodal(modules, heads, ms[0] if ms else None):
        rows.append([label, percent(1 - c["accuracy_mean"])] + _cells(c, ms))
    tables["table7_unimodal_vs_multimodal"] = Table("Table 7: unimodal vs multimodal",
                                                    ["model", "error %"] + _columns(ms), rows)
    return tables


def _label(name: str) -> str:
    return ENSEMBLE_LABEL if name == ENSEMBLE else get_strategy(name).label


def unimodal_vs_multimodal(modules: dict, heads: dict, choice_manifest: int | None = None) -> list[tuple[str, dict]]:
    """Table 7's rows: (label, summary) for the best module of each modality, the unimodal heads, the models
    without an operator and the best multimodal model by validation on the choice manifest."""
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

