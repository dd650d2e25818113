"""Issue #11's targets for the fused model, checked on `embed paper`'s summaries (pipelines/paper_summaries.py).

The fused model is chosen once, by validation accuracy on ONE manifest (the first manifest seed: the "choice
manifest"), and that choice is then scored on every manifest; test accuracy never chooses anything. It is
compared with every unimodal model of the run (modules S1-S3, MLP heads, logistic regressions), per manifest,
against the best of them on that manifest's test split: the hardest comparison, since that unimodal winner is
picked with hindsight.

Summaries are paper_summaries.summarize() dicts keyed by group name: "image S2" (modules), "2A-concat", "LF",
"LR-text", "ensemble" (heads and models over the store).
"""
from __future__ import annotations

from heads.selection import best_by_validation
from heads.strategies import get_strategy, list_strategies

TARGET_ACCURACY = 0.980       # best multimodal model by validation: mean test accuracy over the manifests
TARGET_MARGIN = 0.005         # ... and on every manifest at least this far above the best unimodal model
TARGET_ERROR_RATIO = 0.75     # ... and its error at most this fraction of the best text-only model's

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


def is_multimodal(group: str) -> bool:
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


def _met(ok: bool | None) -> str:
    return "NOT MEASURED" if ok is None else "MET" if ok else "NOT MET"


def targets(modules: dict, heads: dict, manifest_seeds: list[int], choice_manifest: int) -> list[tuple[str, str, str]]:
    """(target, MET / NOT MET / NOT MEASURED, the numbers that decide it)."""
    best = choose_multimodal(heads, choice_manifest)
    if best is None:
        return [(t, _met(None), "no multimodal model ran") for t in
                ("accuracy", "margin over the best unimodal model", "error ratio to text only")]
    out = [(f"the best multimodal model by validation (manifest {choice_manifest}) reaches "
            f"{100 * TARGET_ACCURACY:.1f} % mean test accuracy",
            _met(best["accuracy_mean"] >= TARGET_ACCURACY),
            f"{best['cell']}: {100 * best['accuracy_mean']:.2f} % over {best['runs']} runs")]

    margins, verdicts = [], []
    for m in manifest_seeds:
        mine = _test_on(best, m)
        rivals = [(c, _test_on(c, m)) for c in unimodal(modules, heads)]
        rivals = [(c, a) for c, a in rivals if a is not None]
        if mine is None or not rivals:
            margins.append(f"manifest {m}: not measured")
            verdicts.append(None)
            continue
        rival, acc = max(rivals, key=lambda x: x[1])
        margin = mine - acc
        verdicts.append(margin >= TARGET_MARGIN)
        margins.append(f"manifest {m}: {100 * mine:.2f} % vs {rival['cell']} {100 * acc:.2f} % "
                       f"({100 * margin:+.2f} points)")
    out.append((f"on every manifest at least {100 * TARGET_MARGIN:.1f} points above the best unimodal model "
                "(logistic regressions included; that model picked by test accuracy, with hindsight)",
                _met(False if False in verdicts else None if None in verdicts else True), "; ".join(margins)))

    text = unimodal(modules, heads, "text")
    if not text:
        out.append(("error at most 0.75x text-only's", _met(None), "no text-only model ran"))
        return out
    best_text = max(text, key=lambda c: c["accuracy_mean"])
    e_multi, e_text = 1 - best["accuracy_mean"], 1 - best_text["accuracy_mean"]
    ratio = e_multi / e_text if e_text > 0 else float("inf")
    out.append((f"multimodal error at most {TARGET_ERROR_RATIO}x the best text-only model's",
                _met(ratio <= TARGET_ERROR_RATIO),
                f"error {100 * e_multi:.2f} % ({best['cell']}) / {100 * e_text:.2f} % ({best_text['cell']}) "
                f"= {ratio:.3f}"))
    return out
