"""Issues #11's and #20's targets for the fused model, checked on `embed paper`'s summaries
(pipelines/paper_summaries.py).

The fused model is chosen once, by validation accuracy on ONE manifest (the first manifest seed: the "choice
manifest"), and that choice is then scored on every manifest; test accuracy never chooses anything. It is
compared with every unimodal model of the run (modules S1-S3, MLP heads, logistic regressions), per manifest,
against the best of them on that manifest's test split: the hardest comparison, since that unimodal winner is
picked with hindsight.

Issue #11 scores the choice on the tuning manifests (the plan's manifest seeds). Issue #20 adds check manifests
(`embed paper --check-manifest-seeds`): nothing is chosen on them; its accuracy target averages the tuning
manifests only, its margin target covers every manifest, the check ones included.

Summaries are paper_summaries.summarize() dicts keyed by group name: "image S2" (modules), "2A-concat", "LF",
"LR-text", "ensemble" (heads and models over the store); rows over cross-fitted modules are their own groups,
"1A-concat (cross-fit)", "LFM (cross-fit)" (CROSS_FIT), multimodal candidates like the plain ones.
"""
from __future__ import annotations

from heads.selection import best_by_validation
from heads.strategies import get_strategy, list_strategies

TARGET_ACCURACY = 0.980       # best multimodal model by validation: mean test accuracy over the manifests
TARGET_MARGIN = 0.005         # ... and on every manifest at least this far above the best unimodal model
TARGET_ERROR_RATIO = 0.75     # ... and its error at most this fraction of the best text-only model's
TARGET_ACCURACY_20 = 0.985    # issue #20: mean test accuracy over the tuning manifests
TARGET_MARGIN_20 = 0.005      # issue #20: on every manifest, check manifests included, above the best unimodal model
CROSS_FIT = " (cross-fit)"    # the suffix of a group of runs over cross-fitted modules ("1A-concat (cross-fit)")

ENSEMBLE = "ensemble"   # the top-k ensemble's group (heads/ensemble.py): multimodal, not a registered strategy


def operator_strategies() -> tuple[str, ...]:
    """Multimodal strategies with a fusion operator (their groups are "<strategy>-<operator>")."""
    return list_strategies(fused=True)


def operator_free() -> tuple[str, ...]:
    """Multimodal models without an operator (late fusion, stacking, ..., and the ensemble): one group each."""
    return list_strategies(multimodal=True, fused=False) + (ENSEMBLE,)


def unimodal_heads() -> dict[str, str]:
    """Unimodal strategies over the store -> their modality."""
    return {s: get_strategy(s).modalities[0] for s in list_strategies(multimodal=False)}


def base_group(group: str) -> str:
    """The group without its variant: "1A-concat (cross-fit)" -> "1A-concat"."""
    return group.removesuffix(CROSS_FIT)


def variant_of(group: str) -> str:
    """CROSS_FIT for a group of runs over cross-fitted modules, "" for a plain one."""
    return CROSS_FIT if group.endswith(CROSS_FIT) else ""


def is_multimodal(group: str) -> bool:
    group = base_group(group)
    return group.split("-")[0] in operator_strategies() or group in operator_free()


def unimodal(modules: dict, heads: dict, modality: str | None = None) -> list[dict]:
    """Every unimodal model's summary (modules and heads), of one modality or both."""
    found = [c for k, c in modules.items() if modality is None or k.startswith(f"{modality} S")]
    by_modality = unimodal_heads()
    found += [c for k, c in heads.items() if k in by_modality and modality in (None, by_modality[k])]
    return found


def _val_on(c: dict, manifest: int | None) -> float:
    per = c.get("per_manifest_val", {})
    return per[manifest] if manifest in per else c["val_accuracy_mean"]


def choose_multimodal(heads: dict, choice_manifest: int | None = None, *, pool=None) -> dict | None:
    """The multimodal model with the best validation accuracy on the choice manifest (mean validation accuracy
    over every manifest where the summary has no per-manifest figure; then the overall mean; then heads/selection.py's
    tie rule)."""
    pool = [c for k, c in heads.items() if is_multimodal(k)] if pool is None else pool
    return best_by_validation(pool, val=lambda c: (_val_on(c, choice_manifest), c["val_accuracy_mean"]),
                              name=lambda c: c["cell"])


def _test_on(c: dict, manifest: int) -> float | None:
    entry = c.get("per_manifest", {}).get(manifest)
    return None if entry is None else entry[0]


def mean_on(c: dict, manifests: list[int]) -> float | None:
    """Mean test accuracy over the runs on these manifests (None when it ran on none of them)."""
    per = [c["per_manifest"][m] for m in manifests if m in c.get("per_manifest", {})]
    runs = sum(n for _, _, n in per)
    return sum(mean * n for mean, _, n in per) / runs if runs else None


def _met(ok: bool | None) -> str:
    return "NOT MEASURED" if ok is None else "MET" if ok else "NOT MET"


def targets(modules: dict, heads: dict, manifest_seeds: list[int], choice_manifest: int) -> list[tuple[str, str, str]]:
    """(target, MET / NOT MET / NOT MEASURED, the numbers that decide it)."""
    best = choose_multimodal(heads, choice_manifest)
    if best is None:
        return [(t, _met(None), "no multimodal model ran") for t in
                ("accuracy", "margin over the best unimodal model", "error ratio to text only")]
    accuracy = mean_on(best, manifest_seeds)
    out = [(f"the best multimodal model by validation (manifest {choice_manifest}) reaches "
            f"{100 * TARGET_ACCURACY:.1f} % mean test accuracy",
            _met(None if accuracy is None else accuracy >= TARGET_ACCURACY),
            f"{best['cell']}: {100 * (accuracy or 0):.2f} % over the runs on manifests "
            f"{', '.join(map(str, manifest_seeds))}")]
    verdict, numbers = margin(best, modules, heads, manifest_seeds, TARGET_MARGIN)
    out.append((f"on every manifest at least {100 * TARGET_MARGIN:.1f} points above the best unimodal model "
                "(logistic regressions included; that model picked by test accuracy, with hindsight)",
                verdict, numbers))

    text = unimodal(modules, heads, "text")
    if not text:
        out.append(("error at most 0.75x text-only's", _met(None), "no text-only model ran"))
        return out
    best_text = max(text, key=lambda c: mean_on(c, manifest_seeds) or 0.0)
    e_multi, e_text = 1 - (accuracy or 0.0), 1 - (mean_on(best_text, manifest_seeds) or 0.0)
    ratio = e_multi / e_text if e_text > 0 else float("inf")
    out.append((f"multimodal error at most {TARGET_ERROR_RATIO}x the best text-only model's",
                _met(ratio <= TARGET_ERROR_RATIO),
                f"error {100 * e_multi:.2f} % ({best['cell']}) / {100 * e_text:.2f} % ({best_text['cell']}) "
                f"= {ratio:.3f}"))
    return out


def margin(best: dict, modules: dict, heads: dict, manifests: list[int], least: float) -> tuple[str, str]:
    """(MET / NOT MET / NOT MEASURED, per manifest numbers): `best` at least `least` above the best unimodal model
    of each manifest's test split."""
    margins, verdicts = [], []
    for m in manifests:
        mine = _test_on(best, m)
        rivals = [(c, _test_on(c, m)) for c in unimodal(modules, heads)]
        rivals = [(c, a) for c, a in rivals if a is not None]
        if mine is None or not rivals:
            margins.append(f"manifest {m}: not measured")
            verdicts.append(None)
            continue
        rival, acc = max(rivals, key=lambda x: x[1])
        gap = mine - acc
        verdicts.append(gap >= least)
        margins.append(f"manifest {m}: {100 * mine:.2f} % vs {rival['cell']} {100 * acc:.2f} % "
                       f"({100 * gap:+.2f} points)")
    return _met(False if False in verdicts else None if None in verdicts else True), "; ".join(margins)


def validation_against_test(heads: dict, manifests: list[int], choice_manifest: int) -> str:
    """The chosen multimodal model's validation and test accuracy per manifest, so selection's optimism shows
    (issue #20): on the choice manifest validation chose it among many, so it reads high; on the other manifests
    validation chose nothing, so its gap to test is the split's noise only."""
    best = choose_multimodal(heads, choice_manifest)
    if best is None:
        return "no multimodal model ran"
    parts = []
    for m in manifests:
        val, test = best.get("per_manifest_val", {}).get(m), _test_on(best, m)
        if val is None or test is None:
            parts.append(f"manifest {m}: not measured")
            continue
        chose = " (chose it)" if m == choice_manifest else ""
        parts.append(f"manifest {m}{chose}: validation {100 * val:.2f} %, test {100 * test:.2f} % "
                     f"(validation - test {100 * (val - test):+.2f} points)")
    return f"{best['cell']}: " + "; ".join(parts)


def targets_issue_20(modules: dict, heads: dict, tuning: list[int], check: list[int],
                     choice_manifest: int) -> list[tuple[str, str, str]]:
    """Issue #20's two targets: (target, MET / NOT MET / NOT MEASURED, the numbers that decide it). The model is
    the one chosen by validation on the choice manifest; `check` manifests chose nothing."""
    best = choose_multimodal(heads, choice_manifest)
    names = (f"the best multimodal model by validation (manifest {choice_manifest}) reaches "
             f"{100 * TARGET_ACCURACY_20:.1f} % mean test accuracy on the tuning manifests",
             f"on every manifest, check manifests included, at least {100 * TARGET_MARGIN_20:.1f} points above the "
             "best unimodal model (picked by test accuracy, with hindsight)")
    if best is None:
        return [(name, _met(None), "no multimodal model ran") for name in names]
    accuracy = mean_on(best, tuning)
    where = (f"tuning manifests {', '.join(map(str, tuning))}; check manifests "
             f"{', '.join(map(str, check)) if check else 'none (give --check-manifest-seeds)'}")
    verdict, numbers = margin(best, modules, heads, list(tuning) + list(check), TARGET_MARGIN_20)
    return [(names[0], _met(None if accuracy is None else accuracy >= TARGET_ACCURACY_20),
             f"{best['cell']}: {100 * (accuracy or 0):.2f} % over its runs on the tuning manifests "
             f"{', '.join(map(str, tuning))}"),
            (names[1], verdict, f"{numbers} ({where})")]
