"""The tables of `embed paper`'s report: the paper's Tables 3-7 over the run's summaries (pipelines/paper_summaries.py),
built with the reports' table blocks (heads/tables.py).

Every mean ± std is over all (manifest seed, seed) runs; the per-manifest columns show the spread over draws.
Strategies and operators are ranked by mean test accuracy (the paper's tables); the best multimodal model is chosen
by validation accuracy, never by test. Runs over cross-fitted modules are rows of their own beside the plain ones
("1A (cross-fit)" in Tables 5 and 6, "LFM (cross-fit)" in Tables 5 and 7); check manifests' columns say "(check)".
"""
from __future__ import annotations

from heads.selection import best_summary
from heads.strategies import get_strategy
from heads.tables import (MEAN_HEADER, Table, accuracy_pm, macro_f1_pm, mean_columns, one_decimal, percent, pm,
                          seconds_pm)
from pipelines.paper_summaries import best_module, best_multimodal, cached_strategies, manifest_roles
from pipelines.paper_targets import (CROSS_FIT, ENSEMBLE, base_group, operator_free, operator_strategies,
                                     unimodal_heads, variant_of)

STRATEGY_NAMES = {1: "S1 (classifier only)", 2: "S2 (middle layer + classifier)", 3: "S3 (fine-tuning)"}
ENSEMBLE_LABEL = "top-k multimodal models by validation, probabilities averaged"


def _columns(manifest_seeds: list[int], check: tuple[int, ...] = ()) -> list[str]:
    return (["runs", "accuracy %", "macro-F1 %", "training time (s)", "epochs", "trainable params",
             "non-trainable params"] + [f"accuracy % manifest {m}" + (" (check)" if m in check else "")
                                        for m in manifest_seeds])


def _of(heads: dict, strategy: str, variant: str) -> dict:
    """The groups "<strategy>-<operator>" of one variant ("" plain, CROSS_FIT)."""
    return {k: c for k, c in heads.items() if variant_of(k) == variant and base_group(k).startswith(f"{strategy}-")}


def _cells(c: dict | None, manifest_seeds: list[int]) -> list:
    if c is None:
        return [""] * len(_columns(manifest_seeds))
    return ([c["runs"], accuracy_pm(c), macro_f1_pm(c), seconds_pm(c["train_seconds_mean"], c["train_seconds_std"]),
             one_decimal(c["epochs_mean"]), f"{c['trainable']:,}", f"{c['non_trainable']:,}"]
            + [pm(*c["per_manifest"][m][:2]) if m in c["per_manifest"] else "" for m in manifest_seeds])


def build_tables(plan: dict, modules: dict, heads: dict) -> dict[str, Table]:
    """Tables 3-7 by name (the name of each one's CSV file)."""
    ms = [e["seed"] for e in plan["manifests"]]
    check = tuple(manifest_roles(plan)[1])
    settings, tables = plan["settings"], {}
    for number, modality in ((3, "image"), (4, "text")):
        rows = []
        for strategy in (1, 2, 3):
            c = modules.get(f"{modality} S{strategy}")
            rows.append([STRATEGY_NAMES[strategy]] + (_cells(c, ms) if c else
                                                      ["not run (--no-image-s3)"] + _cells(None, ms)[1:]))
        tables[f"table{number}_{modality}_strategies"] = Table(
            f"Table {number}: {modality} transfer strategies ({settings[f'{modality}_backbone']})",
            ["strategy"] + _columns(ms, check), rows)

    fused, cached = operator_strategies(), cached_strategies()
    fusions = [f for f in settings["fusions"] if any(f"{s}-{f}" in heads for s in fused)]
    fusions += [f for f in settings["end_to_end_fusions"] if f not in fusions and settings["end_to_end"]]
    strategies = [s for s in fused if _of(heads, s, "")]
    # (strategy, variant): each strategy's plain row, then its cross-fit row where cross-fitted modules ran
    variants = [(s, v) for s in fused for v in ("", CROSS_FIT) if _of(heads, s, v)]
    rows = []
    for s, v in variants:   # the best operator by validation (heads/selection.py), as every report chooses
        best = best_summary(_of(heads, s, v).values())
        per_fusion = [accuracy_pm(heads[f"{s}-{f}{v}"]) if f"{s}-{f}{v}" in heads else "" for f in fusions]
        rows.append([s + v, base_group(best["cell"]).split("-", 1)[1]] + _cells(best, ms) + per_fusion)
    for name in operator_free():  # late fusion, stacking, ensembles, linear: one row each, no operator
        for v in ("", CROSS_FIT):
            if name + v in heads:
                rows.append([name + v, "(none)"] + _cells(heads[name + v], ms) + [""] * len(fusions))
    tables["table5_multimodal_strategies"] = Table(
        "Table 5: multimodal fine-tuning strategies (the best operator of each by validation; accuracy per operator "
        "at the right)",
        ["strategy", "best fusion"] + _columns(ms, check) + [f"{f} acc %" for f in fusions], rows)

    rows = []
    for f in fusions:
        of_cached = [heads[f"{s}-{f}"] for s in cached if f"{s}-{f}" in heads]
        rows.append([f] + [accuracy_pm(heads[f"{s}-{f}{v}"]) if f"{s}-{f}{v}" in heads else "" for s, v in variants]
                    + (mean_columns(of_cached, seconds_digits=3) if of_cached else ["", "", ""]))
    tables["table6_fusion_operators"] = Table(
        f"Table 6: fusion operators (mean over the cached strategies {', '.join(cached)} at the right, plain "
        "modules' runs only)",
        ["fusion"] + [f"{s}{v} acc %" for s, v in variants] + MEAN_HEADER, rows)

    rows = []
    for label, c in unimodal_vs_multimodal(modules, heads, (manifest_roles(plan)[0] or [None])[0]):
        rows.append([label, percent(1 - c["accuracy_mean"])] + _cells(c, ms))
    tables["table7_unimodal_vs_multimodal"] = Table("Table 7: unimodal vs multimodal",
                                                    ["model", "error %"] + _columns(ms, check), rows)
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
        for v in ("", CROSS_FIT):
            if name + v in heads:
                picks.append((f"multimodal: {_label(name)} ({name}{v})", heads[name + v]))
    if (c := best_multimodal(heads, choice_manifest=choice_manifest)) is not None:
        where = f" on manifest {choice_manifest}" if choice_manifest is not None else ""
        picks.append((f"multimodal: best by validation{where} ({c['cell']})", c))
    return picks

